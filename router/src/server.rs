//! Startup and shutdown: workers up, wait until ready, serve HTTP, drain, workers down.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::admission::Admission;
use crate::app::{app, AppState, Model};
use crate::cli::{Args, Device};
use crate::conn::{self, ConnectionLimits};
use crate::metrics::Metrics;
use crate::tokenizer::ModelTokenizer;
use crate::worker::supervisor::{self, LaunchSpec};
use crate::worker::token::{WorkerToken, TOKEN_ENV};
use crate::worker::{health, Worker};

/// In-flight requests get this long to finish after SIGINT/SIGTERM (a second signal cuts it short).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// After the drain, the streams still open get this long to send their shutdown error and close.
const FINAL_FLUSH: Duration = Duration::from_secs(2);
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

pub async fn run(args: Args, python: String) -> Result<(), String> {
    let signals = listen_for_signals()?;
    // Bind first: a busy port should fail now, not after the model has loaded.
    let listener = TcpListener::bind((args.host.as_str(), args.port))
        .await
        .map_err(|e| format!("cannot listen on {}:{}: {e}", args.host, args.port))?;
    let metrics = Arc::new(Metrics::new());
    let api_key = args.serve.api_key(args.api_key.as_deref(), |k| std::env::var(k).ok())?;
    let (workers, launches) = plan_workers(&args, &python)?;
    let admission = Admission::new(
        args.max_concurrent_requests,
        args.queue_size,
        Duration::from_secs(args.queue_timeout_secs),
        metrics.queue_depth.clone(),
    );
    let state = Arc::new(AppState::new(
        workers,
        crate::policy::from_kind(args.policy),
        admission,
        metrics,
        api_key,
        args.serve.request_limits(),
        args.serve.health(),
    ));

    let (stop_workers, stop_rx) = watch::channel(false);
    let mut tasks: Vec<_> = launches
        .into_iter()
        .map(|(worker, spec)| tokio::spawn(supervisor::supervise(worker, spec, stop_rx.clone())))
        .collect();
    tasks.push(tokio::spawn(health::poll_forever(state.clone(), stop_rx)));

    eprintln!(
        "saw-router: listening on http://{}:{} (/health answers 503 until a worker is ready)",
        args.host, args.port
    );
    let (startup_failed, startup_failed_rx) = watch::channel(false);
    let interrupted = signals.clone();
    let startup = async {
        tokio::select! {
            ready = wait_ready(&state, &args) => {
                if ready.is_err() {
                    let _ = startup_failed.send(true);
                }
                ready
            }
            _ = signalled(interrupted, 1) => Ok(()),
        }
    };
    let limits = args.serve.connection_limits();
    let (ready, ()) =
        tokio::join!(startup, serve(listener, state.clone(), &limits, signals, startup_failed_rx));

    eprintln!("saw-router: stopping workers");
    let _ = stop_workers.send(true);
    for task in tasks {
        let _ = task.await;
    }
    ready
}

/// Counts SIGINT/SIGTERM deliveries.
fn listen_for_signals() -> Result<watch::Receiver<u32>, String> {
    let mut interrupt = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut terminate = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let (tx, rx) = watch::channel(0u32);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
            tx.send_modify(|n| *n += 1);
        }
    });
    Ok(rx)
}

async fn signalled(mut signals: watch::Receiver<u32>, count: u32) {
    let _ = signals.wait_for(|&n| n >= count).await;
}

/// Serves until a signal (or a failed startup), then drains: open requests get `DRAIN_TIMEOUT`
/// to finish (a second signal cuts that short); the generations still running then end with a
/// "the server is shutting down" error.
async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    limits: &ConnectionLimits,
    signals: watch::Receiver<u32>,
    mut startup_failed: watch::Receiver<bool>,
) {
    let stop = {
        let signals = signals.clone();
        async move {
            tokio::select! {
                _ = signalled(signals, 1) => {
                    eprintln!("saw-router: shutting down: no new connections, draining requests");
                }
                _ = startup_failed.wait_for(|&failed| failed) => {}
            }
        }
    };
    let connections = conn::serve(listener, app(state.clone()), limits, stop).await;
    let drained = connections.shutdown();
    tokio::pin!(drained);
    tokio::select! {
        _ = &mut drained => return,
        _ = tokio::time::sleep(DRAIN_TIMEOUT) => {}
        _ = signalled(signals, 2) => {}
    }
    eprintln!("saw-router: ending the requests still open");
    state.stop_generations.send_replace(true);
    if tokio::time::timeout(FINAL_FLUSH, &mut drained).await.is_err() {
        eprintln!("saw-router: closing the connections still open");
    }
}

/// Waits until every worker answers `Info` (or failed, or the startup timeout passed), and sets
/// up the tokenizer from the first one.
async fn wait_ready(state: &AppState, args: &Args) -> Result<(), String> {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.startup_timeout_secs);
    let mut last_report = started;
    let n = state.workers.len();
    eprintln!("saw-router: waiting for {n} worker(s) to load the model");
    loop {
        for worker in state.workers.iter().filter(|w| !w.is_ready() && !w.is_failed()) {
            let Ok(info) = worker.info().await else { continue };
            eprintln!(
                "saw-router: worker {} ready after {}s: {} on {}, kv {} ({} tokens, {} B/token, {} B/request), \
                 context {}",
                worker.index,
                started.elapsed().as_secs(),
                info.model_id,
                info.device,
                info.kv_format,
                info.kv_capacity_tokens,
                info.kv_bytes_per_token,
                info.kv_window_bytes_per_request,
                info.context_length
            );
            state.metrics.record_worker_info(worker.index, &info);
            if state.model.get().is_none() {
                let tokenizer = ModelTokenizer::from_info(&info)?;
                let local = args.worker_urls.is_empty();
                let name = args.served_model_name.clone().unwrap_or_else(|| {
                    if local {
                        args.model.clone()
                    } else {
                        info.model_id.clone()
                    }
                });
                let aliases =
                    [args.model.clone(), info.model_id.clone()].into_iter().filter(|a| *a != name).collect();
                let _ = state.model.set(Arc::new(Model { name, aliases, tokenizer }));
            }
        }
        let ready = state.workers.iter().filter(|w| w.is_ready()).count();
        let failed = state.workers.iter().filter(|w| w.is_failed()).count();
        let timed_out = Instant::now() >= deadline;
        if ready == n || (ready + failed == n && ready > 0) || (timed_out && ready > 0) {
            if ready < n {
                eprintln!("saw-router: warning: only {ready} of {n} workers are up; serving with those");
            }
            let name = state.model.get().map(|m| m.name.clone()).unwrap_or_default();
            eprintln!(
                "saw-router: ready: serving {name} on http://{}:{} with {ready} worker(s), policy {:?}",
                args.host, args.port, args.policy
            );
            return Ok(());
        }
        if ready + failed == n {
            return Err("no worker could be started (see the worker output above)".into());
        }
        if timed_out {
            return Err(format!(
                "no worker became ready within {}s (--startup-timeout-secs)",
                args.startup_timeout_secs
            ));
        }
        if last_report.elapsed() >= PROGRESS_EVERY {
            last_report = Instant::now();
            eprintln!(
                "saw-router: waiting for workers: {ready}/{n} ready ({}s)",
                started.elapsed().as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

type Launch = (Arc<Worker>, LaunchSpec);

/// Remote workers from `--worker-url`, or `--workers` local ones with how to start each.
fn plan_workers(args: &Args, python: &str) -> Result<(Vec<Arc<Worker>>, Vec<Launch>), String> {
    if !args.worker_urls.is_empty() {
        let token = args.serve.remote_worker_token(|k| std::env::var(k).ok())?;
        let workers = args
            .worker_urls
            .iter()
            .enumerate()
            .map(|(i, url)| {
                let url = if url.contains("://") { url.clone() } else { format!("http://{url}") };
                Worker::new(i, &url, token.as_ref()).map(Arc::new)
            })
            .collect::<Result<Vec<_>, _>>()?;
        return Ok((workers, vec![]));
    }
    if args.workers == 0 {
        return Err("--workers must be at least 1 (or give --worker-url)".into());
    }
    let gpus = visible_gpus();
    let cuda = match args.device {
        Device::Cuda => true,
        Device::Cpu => false,
        Device::Auto => !gpus.is_empty(),
    };
    if cuda && args.workers > gpus.len().max(1) {
        eprintln!(
            "saw-router: warning: {} workers on {} GPU(s): some GPUs hold several workers",
            args.workers,
            gpus.len()
        );
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Local workers accept only calls with this start's token (passed in their environment).
    let token = WorkerToken::generate()?;
    let mut base = vec!["-m".to_string(), "saw_worker".to_string()];
    base.extend(args.worker_flags());
    base.extend(["--device".to_string(), if cuda { "cuda" } else { "cpu" }.to_string()]);
    let mut launches = Vec::new();
    for i in 0..args.workers {
        let port = match args.worker_base_port {
            Some(base) => base.checked_add(i as u16).ok_or("--worker-base-port too high")?,
            None => free_port()?,
        };
        let mut env = vec![(TOKEN_ENV.to_string(), token.as_str().to_string())];
        if cuda && !gpus.is_empty() {
            env.push(("CUDA_VISIBLE_DEVICES".to_string(), gpus[i % gpus.len()].clone()));
        }
        if !cuda && std::env::var_os("OMP_NUM_THREADS").is_none() {
            // CPU workers share the cores instead of each spinning a thread per core.
            env.push(("OMP_NUM_THREADS".to_string(), (cores / args.workers).max(1).to_string()));
        }
        let worker = Arc::new(Worker::new(i, &format!("http://127.0.0.1:{port}"), Some(&token))?);
        let spec = LaunchSpec { python: python.to_string(), args: base.clone(), port, env };
        launches.push((worker, spec));
    }
    Ok((launches.iter().map(|(w, _)| w.clone()).collect(), launches))
}

/// GPU ids the workers may use: `CUDA_VISIBLE_DEVICES` when set, else the /dev/nvidiaN devices.
fn visible_gpus() -> Vec<String> {
    if let Ok(list) = std::env::var("CUDA_VISIBLE_DEVICES") {
        return list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty() && *s != "-1")
            .map(String::from)
            .collect();
    }
    let mut ids: Vec<u32> = std::fs::read_dir("/dev")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("nvidia")?.parse().ok()).collect()
        })
        .unwrap_or_default();
    ids.sort_unstable();
    ids.into_iter().map(|i| i.to_string()).collect()
}

/// A port nobody listens on right now (the worker binds it a moment later).
fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("no free port: {e}"))?;
    listener.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

//! Local worker processes: spawn, pass their output through, restart on crash, stop on shutdown.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use super::Worker;

/// Time a worker gets to exit after SIGTERM before its process group is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
const RESTART_DELAY: Duration = Duration::from_secs(2);

/// How to start one local worker.
#[derive(Clone, Debug)]
pub struct LaunchSpec {
    pub python: String,
    /// `-m saw_worker ...` without `--port`.
    pub args: Vec<String>,
    pub port: u16,
    pub env: Vec<(String, String)>,
}

/// Keeps worker `worker.index` running until `shutdown` fires, then stops it.
pub async fn supervise(worker: Arc<Worker>, spec: LaunchSpec, mut shutdown: watch::Receiver<bool>) {
    let i = worker.index;
    loop {
        let mut child = match spawn(&spec, i) {
            Ok(child) => child,
            Err(e) => {
                eprintln!("saw-router: cannot start worker {i} ({}): {e}", spec.python);
                worker.mark_failed();
                return;
            }
        };
        tokio::select! {
            status = child.wait() => {
                worker.set_healthy(false);
                let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
                if !worker.is_ready() {
                    // Dying before it ever answered means a setup problem; restarting would loop.
                    eprintln!("saw-router: worker {i} exited during startup ({status}); see its output above");
                    worker.mark_failed();
                    return;
                }
                eprintln!("saw-router: worker {i} exited ({status}); restarting");
                tokio::select! {
                    _ = tokio::time::sleep(RESTART_DELAY) => {}
                    _ = shutdown.changed() => return,
                }
            }
            _ = shutdown.changed() => {
                stop(&mut child, i).await;
                return;
            }
        }
    }
}

fn spawn(spec: &LaunchSpec, index: usize) -> std::io::Result<Child> {
    let mut cmd = Command::new(&spec.python);
    cmd.args(&spec.args)
        .args(["--host", "127.0.0.1", "--port", &spec.port.to_string()])
        .envs(spec.env.iter().cloned())
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Own process group, so stopping it also stops anything the worker started.
        .process_group(0)
        .kill_on_drop(true);
    // SAFETY: prctl is async-signal-safe; it makes the kernel kill the worker if the router dies
    // without cleaning up (e.g. SIGKILL), so no worker is ever orphaned.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    if let Some(out) = child.stdout.take() {
        tokio::spawn(relay(out, tokio::io::stdout(), index));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(relay(err, tokio::io::stderr(), index));
    }
    Ok(child)
}

/// Copies lines from a worker pipe, prefixed with `[worker i]`.
async fn relay(pipe: impl AsyncRead + Unpin, mut sink: impl AsyncWrite + Unpin, index: usize) {
    let mut lines = BufReader::new(pipe);
    let mut line = Vec::new();
    loop {
        line.clear();
        match lines.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                let out = format!("[worker {index}] {}\n", text.trim_end_matches(['\r', '\n']));
                let _ = sink.write_all(out.as_bytes()).await;
                let _ = sink.flush().await;
            }
        }
    }
}

/// SIGTERM to the worker's process group, then SIGKILL if it is still there after the grace time.
async fn stop(child: &mut Child, index: usize) {
    let Some(pid) = child.id() else { return };
    signal_group(pid, libc::SIGTERM);
    if tokio::time::timeout(STOP_GRACE, child.wait()).await.is_err() {
        eprintln!("saw-router: worker {index} did not exit in {STOP_GRACE:?}; killing it");
        signal_group(pid, libc::SIGKILL);
        let _ = child.wait().await;
    } else {
        // The leader is gone; make sure nothing it started survives it.
        signal_group(pid, libc::SIGKILL);
    }
}

fn signal_group(pgid: u32, signal: libc::c_int) {
    // SAFETY: plain syscall; the group id is our own child's pid (process_group(0)).
    unsafe {
        libc::killpg(pgid as libc::pid_t, signal);
    }
}

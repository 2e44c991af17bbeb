//! A persistent thread pool for the decode step's matrix-vector products: a worker per core but the caller's,
//! spinning a short while for the next call before it parks. A call's work is split into chunks that the caller
//! and the workers claim one at a time, so a thread the OS takes away for a while (a 2-core machine also runs the
//! router and the worker's I/O) delays the call by one chunk, not by a fixed share of it.
//!
//! A scoped spawn per call costs ~10-20 us, and a decode step makes ~100 of these calls
//! (bench/results/cpu-fused-2026-12-04: a per-call spawn made the step slower). The spin covers the few to tens of
//! microseconds between one projection and the next; past `SPIN` a worker parks, so an idle worker takes no core.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins before it parks: longer than the gaps inside a decode step, shorter than the
/// host's work between steps.
const SPIN: Duration = Duration::from_micros(300);

/// Most chunks a call may have (they are counted in 16 bits of `Shared::claim`).
pub const MAX_CHUNKS: usize = u16::MAX as usize;

struct Shared {
    /// the current call's epoch (high 32 bits), its chunk count (16) and the next unclaimed chunk (low 16)
    claim: AtomicU64,
    /// chunks of the current call finished
    done: AtomicUsize,
    /// the current call's chunk function: read only by a thread that has claimed one of its chunks, while the
    /// caller waits for that chunk
    job: UnsafeCell<*const (dyn Fn(usize) + Sync)>,
    /// workers parked, guarded for the condition variable
    parked: Mutex<usize>,
    wake: Condvar,
}

// SAFETY: `job` is written by the caller (holding `Pool::calls`) before it publishes the call's epoch, and read by
// a thread only after it claimed a chunk of that epoch, which the caller waits for before returning.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

impl Shared {
    /// Claim the next chunk of call `epoch`, if it has one left.
    fn claim(&self, epoch: u64) -> Option<usize> {
        let mut cur = self.claim.load(Ordering::Acquire);
        loop {
            let (chunks, next) = ((cur >> 16) & 0xffff, cur & 0xffff);
            if cur >> 32 != epoch || next >= chunks {
                return None;
            }
            match self.claim.compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(next as usize),
                Err(now) => cur = now,
            }
        }
    }

    /// Run chunks of call `epoch` until none is left.
    fn work_on(&self, epoch: u64) {
        while let Some(chunk) = self.claim(epoch) {
            // SAFETY: see `Shared`: the chunk claimed keeps the caller, and so `job`, waiting.
            let run = std::panic::AssertUnwindSafe(|| unsafe { (**self.job.get())(chunk) });
            if std::panic::catch_unwind(run).is_err() {
                // the call's other threads would wait for this chunk, or run on a closure unwound from under them
                std::process::abort();
            }
            self.done.fetch_add(1, Ordering::Release);
        }
    }
}

pub struct Pool {
    shared: Arc<Shared>,
    workers: usize,
    /// one call at a time
    calls: Mutex<u64>,
}

impl Pool {
    fn new(workers: usize) -> Self {
        fn nothing(_: usize) {}
        let shared = Arc::new(Shared {
            claim: AtomicU64::new(0),
            done: AtomicUsize::new(0),
            job: UnsafeCell::new(&nothing as &(dyn Fn(usize) + Sync)),
            parked: Mutex::new(0),
            wake: Condvar::new(),
        });
        for index in 1..=workers {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("saw-matvec-{index}"))
                .spawn(move || work(&shared))
                .expect("cannot start a matvec worker thread");
        }
        Self { shared, workers, calls: Mutex::new(0) }
    }

    /// `f(0)`, ..., `f(chunks - 1)` (at most MAX_CHUNKS) over the caller and the workers, or the caller alone with
    /// `threads` 1; returns when all are done.
    pub fn run(&self, chunks: usize, threads: usize, f: &(dyn Fn(usize) + Sync)) {
        assert!(chunks <= MAX_CHUNKS, "{chunks} chunks");
        if chunks <= 1 || threads <= 1 || self.workers == 0 {
            (0..chunks).for_each(f);
            return;
        }
        let mut epoch = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        *epoch = (*epoch + 1) & 0xffff_ffff;
        let s = &*self.shared;
        // SAFETY: see `Shared`; the pointer's lifetime is erased, and `f` outlives every use: the call returns
        // only when all its chunks are done, and no thread reads `job` without a chunk of this epoch.
        unsafe {
            let f: *const (dyn Fn(usize) + Sync + '_) = f;
            *s.job.get() =
                std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), *const (dyn Fn(usize) + Sync)>(f);
        }
        s.done.store(0, Ordering::Relaxed);
        s.claim.store(*epoch << 32 | (chunks as u64) << 16, Ordering::Release);
        if *s.parked.lock().unwrap_or_else(|e| e.into_inner()) > 0 {
            s.wake.notify_all();
        }
        s.work_on(*epoch);
        while s.done.load(Ordering::Acquire) != chunks {
            std::hint::spin_loop();
        }
    }
}

fn work(s: &Shared) {
    let mut seen = 0;
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        let epoch = loop {
            let e = s.claim.load(Ordering::Acquire) >> 32;
            if e != seen {
                break e;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64) && start.elapsed() > SPIN {
                let mut parked = s.parked.lock().unwrap_or_else(|e| e.into_inner());
                *parked += 1;
                while s.claim.load(Ordering::Acquire) >> 32 == seen {
                    parked = s.wake.wait(parked).unwrap_or_else(|e| e.into_inner());
                }
                *parked -= 1;
            }
            std::hint::spin_loop();
        };
        seen = epoch;
        s.work_on(epoch);
    }
}

/// The process's pool: a worker for each core but the caller's, started by the first call.
pub fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool::new(std::thread::available_parallelism().map_or(0, |n| n.get() - 1)))
}

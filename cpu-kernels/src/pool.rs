//! A persistent thread pool for the decode step's matrix-vector products: `threads - 1` workers that spin a
//! short while for the next call before parking, and the caller, which takes the first part itself.
//!
//! A scoped spawn per call costs ~10-20 us, and a decode step makes ~100 of these calls
//! (bench/results/cpu-fused-2026-12-04: a per-call spawn made the step slower). The spin covers the few to tens of
//! microseconds between one projection and the next; past `SPIN` a worker parks, so an idle worker takes no core.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins before it parks: longer than the gaps inside a decode step, shorter than the
/// host's work between steps.
const SPIN: Duration = Duration::from_micros(300);

/// The part function of the current call, valid from its epoch's start to its `pending` reaching zero.
#[derive(Clone, Copy)]
struct Job {
    f: *const (dyn Fn(usize) + Sync),
    parts: usize,
}

struct Shared {
    /// bumped once per call, after `job` is written
    epoch: AtomicUsize,
    job: UnsafeCell<Job>,
    /// workers that have not finished the current call
    pending: AtomicUsize,
    /// workers parked, guarded for the condition variable
    parked: Mutex<usize>,
    wake: Condvar,
}

// SAFETY: `job` is written only by the caller holding `Pool::calls`, while no worker reads it (every worker has
// finished the previous call: pending is 0), and read by workers only after the epoch's Acquire load.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

pub struct Pool {
    shared: Arc<Shared>,
    workers: usize,
    /// one call at a time
    calls: Mutex<()>,
}

impl Pool {
    fn new(workers: usize) -> Self {
        fn nothing(_: usize) {}
        let shared = Arc::new(Shared {
            epoch: AtomicUsize::new(0),
            job: UnsafeCell::new(Job { f: &nothing as &(dyn Fn(usize) + Sync), parts: 0 }),
            pending: AtomicUsize::new(0),
            parked: Mutex::new(0),
            wake: Condvar::new(),
        });
        for index in 1..=workers {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("saw-matvec-{index}"))
                .spawn(move || work(&shared, index))
                .expect("cannot start a matvec worker thread");
        }
        Self { shared, workers, calls: Mutex::new(()) }
    }

    /// `f(0)`, ..., `f(parts - 1)`, each on its own thread (the caller runs part 0); returns when all are done.
    /// Parts beyond the pool's threads run on the caller after its own.
    pub fn run(&self, parts: usize, f: &(dyn Fn(usize) + Sync)) {
        if parts <= 1 || self.workers == 0 {
            (0..parts).for_each(f);
            return;
        }
        let _one = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        // SAFETY: see `Shared`; the pointer's lifetime is erased, and `f` outlives the call, which waits for
        // every worker below before returning.
        unsafe {
            let f: *const (dyn Fn(usize) + Sync + '_) = f;
            let f =
                std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), *const (dyn Fn(usize) + Sync)>(f);
            *s.job.get() = Job { f, parts };
        }
        s.pending.store(self.workers, Ordering::Relaxed);
        s.epoch.fetch_add(1, Ordering::Release);
        if *s.parked.lock().unwrap_or_else(|e| e.into_inner()) > 0 {
            s.wake.notify_all();
        }
        f(0);
        (self.workers + 1..parts).for_each(f);
        while s.pending.load(Ordering::Acquire) != 0 {
            std::hint::spin_loop();
        }
    }
}

fn work(s: &Shared, index: usize) {
    let mut seen = 0;
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        let epoch = loop {
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen {
                break e;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64) && start.elapsed() > SPIN {
                let mut parked = s.parked.lock().unwrap_or_else(|e| e.into_inner());
                *parked += 1;
                while s.epoch.load(Ordering::Acquire) == seen {
                    parked = s.wake.wait(parked).unwrap_or_else(|e| e.into_inner());
                }
                *parked -= 1;
            }
            std::hint::spin_loop();
        };
        seen = epoch;
        // SAFETY: see `Shared`: the job of this epoch stays valid until `pending` reaches zero.
        let job = unsafe { *s.job.get() };
        if index < job.parts {
            // SAFETY: as above.
            unsafe { (*job.f)(index) };
        }
        s.pending.fetch_sub(1, Ordering::Release);
    }
}

/// The process's pool: a worker for each core but the caller's, started by the first call.
pub fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool::new(std::thread::available_parallelism().map_or(0, |n| n.get() - 1)))
}

//! A spinning thread team for the decode step. A single-token step runs ~130 mat-vecs of
//! 0.1–1 ms each; handing each to rayon let its idle worker fall asleep in between, and waking
//! it (a futex on a VM) cost ~0.1 ms per product — 14 of 74 ms per token measured on the
//! full decoder. Inside [`with_team`] the pool's other workers stay in a spin loop and take
//! the tasks of each [`parallel_for`] as soon as it is published.
//!
//! Tasks are claimed from one word holding (epoch, task count, next task), so a late helper
//! can never run a finished job: its claim fails once the epoch moves on, and the publisher
//! waits until every claimed task is done before the job's closure goes out of scope. The
//! publisher works too, so a helper that never arrives only costs speed. Code inside the team
//! should not use rayon directly (its workers are busy spinning); if it does, a helper that
//! rayon runs on the team's own thread returns at once instead of waiting for itself.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};

use rayon::prelude::*;

/// The job every member runs for task indices `0..tasks`.
type Job<'a> = dyn Fn(usize) + Sync + 'a;

/// Bits of the task count and of the next task in the state word.
const TASK_BITS: u32 = 20;
const TASK_MASK: u64 = (1 << TASK_BITS) - 1;

/// Whether state `s` has a task left to claim.
fn claimable(s: u64) -> bool {
    (s & TASK_MASK) < ((s >> TASK_BITS) & TASK_MASK)
}

struct Shared {
    /// epoch << 40 | tasks << 20 | next unclaimed task.
    state: AtomicU64,
    /// The current epoch's job: a thin pointer to a `&Job` that lives on the publisher's
    /// stack for the whole epoch (a fat pointer cannot be stored atomically).
    job: AtomicPtr<&'static Job<'static>>,
    done: AtomicUsize,
    exit: AtomicBool,
}

impl Shared {
    /// Claims and runs tasks of the current epoch until none is left.
    fn work(&self) {
        let mut s = self.state.load(Ordering::Acquire);
        while claimable(s) {
            let next = s & TASK_MASK;
            match self.state.compare_exchange_weak(s, s + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    let job = self.job.load(Ordering::Acquire);
                    let _count = Done(&self.done);
                    // SAFETY: the claim succeeded in this job's epoch, so the publisher is still
                    // waiting in `parallel_for` (it waits for every claimed task): the `&Job`
                    // the pointer points at and the closure it refers to are both alive.
                    unsafe { (*job)(next as usize) };
                    s = self.state.load(Ordering::Acquire);
                }
                Err(now) => s = now,
            }
        }
    }

    /// A helper's loop: take tasks as they appear until the team ends.
    fn help(&self) {
        // On the team's own thread (rayon can run a queued helper there while that thread
        // waits inside some other parallel call), spinning would wait for itself.
        if CURRENT.with(|c| std::ptr::eq(c.get(), self)) {
            return;
        }
        let mut idle = 0u32;
        while !self.exit.load(Ordering::Acquire) {
            if claimable(self.state.load(Ordering::Acquire)) {
                self.work();
                idle = 0;
            } else {
                idle = idle.saturating_add(1);
                if idle > 1 << 16 {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            }
        }
    }
}

/// Counts a claimed task as done when dropped (also when the task panics).
struct Done<'a>(&'a AtomicUsize);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Release);
    }
}

/// Ends a [`parallel_for`] epoch when dropped (also on a panic): closes it to new claims and
/// waits until every claimed task is done, so nothing refers to the job afterwards.
struct Close<'a>(&'a Shared);

impl Drop for Close<'_> {
    fn drop(&mut self) {
        let st = &self.0.state;
        let mut s = st.load(Ordering::Acquire);
        let claimed = loop {
            let (tasks, next) = ((s >> TASK_BITS) & TASK_MASK, s & TASK_MASK);
            if next >= tasks {
                break next;
            }
            match st.compare_exchange_weak(s, (s & !TASK_MASK) | tasks, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break next,
                Err(now) => s = now,
            }
        };
        while self.0.done.load(Ordering::Acquire) < claimed as usize {
            std::hint::spin_loop();
        }
    }
}

/// Sets the team's exit flag when dropped (also on a panic), so helpers never spin forever.
struct Exit<'a>(&'a Shared);

impl Drop for Exit<'_> {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(std::ptr::null()));
        self.0.exit.store(true, Ordering::Release);
    }
}

thread_local! {
    static CURRENT: Cell<*const Shared> = const { Cell::new(std::ptr::null()) };
}

/// Runs `f` with the rayon pool's other workers spinning as helpers for every
/// [`parallel_for`] `f` makes on this thread (with one thread, `f` runs alone).
pub fn with_team<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let threads = rayon::current_num_threads();
    if threads <= 1 || !CURRENT.with(|c| c.get().is_null()) {
        return f();
    }
    let shared = Shared {
        state: AtomicU64::new(0),
        job: AtomicPtr::new(std::ptr::null_mut()),
        done: AtomicUsize::new(0),
        exit: AtomicBool::new(false),
    };
    rayon::scope(|scope| {
        CURRENT.with(|c| c.set(&shared));
        let _exit = Exit(&shared);
        for _ in 1..threads {
            scope.spawn(|_| shared.help());
        }
        f()
    })
}

/// Runs `f(i)` for `i` in `0..tasks` over the current team, or over rayon outside one.
pub fn parallel_for(tasks: usize, f: impl Fn(usize) + Sync) {
    let shared = CURRENT.with(|c| c.get());
    if shared.is_null() || tasks as u64 > TASK_MASK {
        (0..tasks).into_par_iter().for_each(&f);
        return;
    }
    // SAFETY: `with_team` keeps the `Shared` alive while CURRENT points at it.
    let shared = unsafe { &*shared };
    let job: &Job<'_> = &f;
    // Helpers see the job as `'static`; it is only called while this frame (which owns `job`
    // and `f`) waits in `Close` for every claimed task (see `work`).
    let thin: *const &Job<'_> = &job;
    shared.job.store(thin.cast::<&'static Job<'static>>().cast_mut(), Ordering::Release);
    shared.done.store(0, Ordering::Release);
    let epoch = (shared.state.load(Ordering::Acquire) >> (2 * TASK_BITS)).wrapping_add(1);
    shared.state.store((epoch << (2 * TASK_BITS)) | ((tasks as u64) << TASK_BITS), Ordering::Release);
    let _close = Close(shared);
    shared.work();
}

/// A pointer that tasks write disjoint chunks through.
struct ChunkPtr<T>(*mut T);
impl<T> Clone for ChunkPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for ChunkPtr<T> {}
// SAFETY: `parallel_chunks` hands each chunk to exactly one task.
unsafe impl<T: Send> Send for ChunkPtr<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for ChunkPtr<T> {}

/// Runs `f(i, chunk)` for each `size`-long chunk of `data` (the last may be shorter) with
/// [`parallel_for`].
pub fn parallel_chunks<T: Send>(data: &mut [T], size: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let (len, size) = (data.len(), size.max(1));
    let ptr = ChunkPtr(data.as_mut_ptr());
    parallel_for(len.div_ceil(size), |i| {
        let p = ptr;
        let start = i * size;
        // SAFETY: chunk i is start..min(start+size, len) inside `data`, and parallel_for runs
        // each i once, so no two tasks share an element.
        let chunk = unsafe { std::slice::from_raw_parts_mut(p.0.add(start), size.min(len - start)) };
        f(i, chunk);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_in_and_out_of_a_team() {
        for team in [false, true] {
            let mut hits = vec![0u32; 1000];
            let run = |hits: &mut Vec<u32>| {
                for round in 0..200 {
                    let size = 1 + round % 37;
                    parallel_chunks(hits, size, |i, c| {
                        for (j, h) in c.iter_mut().enumerate() {
                            assert_eq!((i * size + j) / size, i);
                            *h += 1;
                        }
                    });
                }
            };
            if team {
                with_team(|| run(&mut hits));
            } else {
                run(&mut hits);
            }
            assert!(hits.iter().all(|&h| h == 200), "team={team}");
        }
    }

    #[test]
    fn rayon_inside_a_team_does_not_deadlock() {
        for _ in 0..50 {
            let total: u64 = with_team(|| {
                let a: u64 = (0..10_000u64).into_par_iter().map(|i| i % 7).sum();
                let mut v = vec![0u64; 64];
                parallel_chunks(&mut v, 8, |i, c| c.iter_mut().for_each(|x| *x = i as u64));
                a + v.iter().sum::<u64>()
            });
            assert_eq!(total, (0..10_000u64).map(|i| i % 7).sum::<u64>() + 8 * (0..8).sum::<u64>());
        }
    }
}

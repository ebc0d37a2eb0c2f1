//! Forward passes that need no gradient (evaluation, feature caches) spread over the CPU's
//! cores.
//!
//! On the CPU one forward pass leaves cores idle: only the larger matrix products use several,
//! and the element-wise work between them (attention, norms, activations) runs on one. So
//! independent batches run side by side instead, each on a core of its own: a one-thread rayon
//! pool, which keeps that batch's matrix products on it too. Serving's lanes do the same for
//! requests (`serve::Lanes`).

use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::Device;

/// `f(0), f(1), ..., f(jobs - 1)`, in that order. On the CPU as many jobs run at once as the
/// current rayon pool has threads, each on one core; on a GPU, or with one thread, they run one
/// after another on the calling thread. After an error no further job starts; the error of the
/// lowest failing job is returned.
pub(crate) fn map_on_cores<T, E, F>(device: &Device, jobs: usize, f: F) -> Result<Vec<T>, E>
where
    T: Send,
    E: Send,
    F: Fn(usize) -> Result<T, E> + Sync,
{
    let workers = if device.is_cpu() {
        rayon::current_num_threads().min(jobs)
    } else {
        1
    };
    let pools = if workers > 1 {
        one_thread_pools(workers, "kiln-eval")
    } else {
        Vec::new()
    };
    if pools.len() < 2 {
        return (0..jobs).map(f).collect();
    }

    let next = AtomicUsize::new(0);
    let mut done: Vec<(usize, Result<T, E>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = pools
            .iter()
            .map(|pool| {
                let (next, f) = (&next, &f);
                scope.spawn(move || {
                    pool.install(|| {
                        let mut done = Vec::new();
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i >= jobs {
                                break;
                            }
                            let result = f(i);
                            let failed = result.is_err();
                            done.push((i, result));
                            if failed {
                                // No job starts after a failure.
                                next.fetch_max(jobs, Ordering::Relaxed);
                                break;
                            }
                        }
                        done
                    })
                })
            })
            .collect();
        let mut all = Vec::with_capacity(jobs);
        for handle in handles {
            match handle.join() {
                Ok(part) => all.extend(part),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        all
    });
    done.sort_by_key(|(i, _)| *i);
    let mut out = Vec::with_capacity(jobs);
    for (_, result) in done {
        out.push(result?);
    }
    // Every job ran: a job is skipped only after another's failure, returned above.
    debug_assert_eq!(out.len(), jobs);
    Ok(out)
}

/// Up to `n` one-thread rayon pools, their threads named `{prefix}-{i}`; fewer when threads
/// cannot be started.
pub(crate) fn one_thread_pools(n: usize, prefix: &'static str) -> Vec<rayon::ThreadPool> {
    (0..n)
        .map_while(|i| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .thread_name(move |_| format!("{prefix}-{i}"))
                .build()
                .ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_pool<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(f)
    }

    #[test]
    fn results_come_back_in_job_order_on_several_cores() {
        for threads in [1, 2, 3] {
            let got = in_pool(threads, || {
                map_on_cores(&Device::Cpu, 25, |i| {
                    // Uneven work, so jobs finish out of order.
                    std::thread::sleep(std::time::Duration::from_millis((i % 3) as u64));
                    Ok::<_, String>((i * i, std::thread::current().name().map(str::to_owned)))
                })
            })
            .unwrap();
            let values: Vec<usize> = got.iter().map(|(v, _)| *v).collect();
            assert_eq!(values, (0..25).map(|i| i * i).collect::<Vec<_>>());
            // With several threads the jobs ran on the one-thread pools.
            let on_pools = got
                .iter()
                .all(|(_, name)| name.as_deref().is_some_and(|n| n.starts_with("kiln-eval-")));
            assert_eq!(on_pools, threads > 1, "threads {threads}");
        }
        let none = map_on_cores(&Device::Cpu, 0, Ok::<usize, String>).unwrap();
        assert!(none.is_empty());
    }

    #[test]
    fn the_lowest_failing_job_gives_the_error_and_later_jobs_do_not_start() {
        let started = AtomicUsize::new(0);
        let got = in_pool(2, || {
            map_on_cores(&Device::Cpu, 100, |i| {
                started.fetch_add(1, Ordering::Relaxed);
                if i == 3 || i == 5 {
                    Err(format!("job {i} failed"))
                } else {
                    Ok(i)
                }
            })
        });
        assert_eq!(got.unwrap_err(), "job 3 failed");
        assert!(started.load(Ordering::Relaxed) < 100);
    }
}

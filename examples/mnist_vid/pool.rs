//! Independent training runs on worker threads (one run per core beats one run on several
//! cores for these small models), with a progress bar.

use std::collections::VecDeque;
use std::sync::{mpsc, Mutex};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

/// A progress bar labelled `prefix`.
pub fn bar(len: u64, prefix: &'static str) -> ProgressBar {
    let pb = ProgressBar::new(len).with_prefix(prefix);
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix:>8} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb
}

/// Prints above the bar, or plainly when it is hidden (no terminal).
pub fn log(pb: &ProgressBar, line: String) {
    if pb.is_hidden() {
        eprintln!("{line}");
    } else {
        pb.println(line);
    }
}

/// Runs `run(&context, job)` for every job of `order` (indices into `jobs`, taken in that
/// order), `workers` at a time, each worker with its own `make_context()` (handles to shared
/// tensors: a tensor may move between threads but not be shared by them). Logs
/// `describe(job, result, seconds)` as runs end. Returns (result, seconds) in `jobs` order.
/// The first error stops the other workers at their next job and is returned.
pub fn run_jobs<J: Sync, C: Send, R: Send>(
    jobs: &[J],
    order: Vec<usize>,
    workers: usize,
    label: &'static str,
    make_context: impl Fn() -> C,
    run: impl Fn(&C, &J) -> anyhow::Result<R> + Sync,
    describe: impl Fn(&J, &R, f64) -> String,
) -> anyhow::Result<Vec<(R, f64)>> {
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let queue = Mutex::new(VecDeque::from(order));
    let pb = bar(jobs.len() as u64, label);
    let (tx, rx) = mpsc::channel();
    let mut done: Vec<Option<(R, f64)>> = (0..jobs.len()).map(|_| None).collect();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        for _ in 0..workers.clamp(1, jobs.len()) {
            let (tx, queue, run) = (tx.clone(), &queue, &run);
            let context = make_context();
            scope.spawn(move || loop {
                let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
                let Some(i) = next else { break };
                let t0 = Instant::now();
                let outcome = run(&context, &jobs[i]);
                let failed = outcome.is_err();
                let _ = tx.send((i, outcome, t0.elapsed().as_secs_f64()));
                if failed {
                    queue.lock().unwrap_or_else(|e| e.into_inner()).clear();
                    break;
                }
            });
        }
        drop(tx);
        for (i, outcome, seconds) in rx {
            let result = outcome?;
            log(&pb, describe(&jobs[i], &result, seconds));
            pb.inc(1);
            done[i] = Some((result, seconds));
        }
        Ok(())
    })?;
    pb.finish_and_clear();
    Ok(done.into_iter().flatten().collect())
}

//! Which share of an extraction this process takes when a cluster launcher
//! started it: `torchrun` (`RANK`, `WORLD_SIZE`), `srun` (`SLURM_PROCID`,
//! `SLURM_NTASKS`), a Slurm job array (`SLURM_ARRAY_TASK_ID`,
//! `SLURM_ARRAY_TASK_COUNT`, with `SLURM_ARRAY_TASK_MIN` and
//! `SLURM_ARRAY_TASK_STEP` for arrays like `--array=1-15:2`), or an array
//! whose tasks each run `srun` (worker `array index x tasks + task`). The
//! split is the one of `--num-workers` / `--worker-index`: worker `I` of
//! `N` takes shards `s % N == I`.

use crate::error::{ExtractError, Result};

/// Worker `index` of `count`, as a launcher said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerSplit {
    /// This worker, in `0..count`.
    pub index: u32,
    /// Workers in all.
    pub count: u32,
    /// Where it came from, e.g. `Slurm array task 3 of 8
    /// (SLURM_ARRAY_TASK_ID=4, SLURM_ARRAY_TASK_MIN=1)`.
    pub source: String,
}

fn bad(var: &'static str, value: &str, what: impl Into<String>) -> ExtractError {
    ExtractError::Setting { flag: var, value: value.to_owned(), expected: what.into() }
}

/// The split a launcher's variables describe (`get` reads one, e.g.
/// `std::env::var(name).ok()`), or `None` when no launcher started more
/// than one worker.
///
/// # Errors
/// A variable that is not a number, or a rank past the count, naming the
/// variable.
pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Option<WorkerSplit>> {
    let num = |var: &'static str| -> Result<Option<u32>> {
        match get(var) {
            None => Ok(None),
            Some(v) => v.trim().parse::<u32>().map(Some).map_err(|_| bad(var, &v, "must be a non-negative integer")),
        }
    };
    let pair = |rank: &'static str, size: &'static str| -> Result<Option<(u32, u32)>> {
        match (num(rank)?, num(size)?) {
            (None, None) => Ok(None),
            (Some(r), Some(n)) if n >= 1 && r < n => Ok(Some((r, n))),
            (Some(r), Some(n)) => Err(bad(rank, &r.to_string(), format!("must be below {size}={n}"))),
            (None, Some(_)) => Err(bad(rank, "(unset)", format!("must be set when {size} is"))),
            (Some(_), None) => Err(bad(size, "(unset)", format!("must be set when {rank} is"))),
        }
    };
    if let Some((r, n)) = pair("RANK", "WORLD_SIZE")? {
        let split = WorkerSplit { index: r, count: n, source: format!("torchrun (RANK={r}, WORLD_SIZE={n})") };
        return Ok((n > 1).then_some(split));
    }
    let task = pair("SLURM_PROCID", "SLURM_NTASKS")?;
    let array = match (num("SLURM_ARRAY_TASK_ID")?, num("SLURM_ARRAY_TASK_COUNT")?) {
        (None, _) => None,
        (Some(id), count) => {
            let count = count.ok_or_else(|| bad("SLURM_ARRAY_TASK_COUNT", "(unset)", "must be set when SLURM_ARRAY_TASK_ID is"))?;
            let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            let step = num("SLURM_ARRAY_TASK_STEP")?.unwrap_or(1).max(1);
            let offset = id
                .checked_sub(min)
                .ok_or_else(|| bad("SLURM_ARRAY_TASK_ID", &id.to_string(), format!("below SLURM_ARRAY_TASK_MIN={min}")))?;
            if offset % step != 0 || offset / step >= count {
                return Err(bad(
                    "SLURM_ARRAY_TASK_ID",
                    &id.to_string(),
                    format!("not one of the {count} tasks of an array from {min} in steps of {step}"),
                ));
            }
            Some((offset / step, count, id, min))
        }
    };
    let (t, nt) = task.unwrap_or((0, 1));
    let split = match array {
        None => WorkerSplit { index: t, count: nt, source: format!("srun task {t} of {nt} (SLURM_PROCID, SLURM_NTASKS)") },
        Some((a, na, id, min)) => {
            let index = a.checked_mul(nt).and_then(|x| x.checked_add(t));
            let count = na.checked_mul(nt);
            let (Some(index), Some(count)) = (index, count) else {
                return Err(bad("SLURM_ARRAY_TASK_COUNT", &na.to_string(), "too many workers"));
            };
            let tasks = if nt > 1 { format!(", srun task {t} of {nt}") } else { String::new() };
            WorkerSplit {
                index,
                count,
                source: format!("Slurm array task {a} of {na} (SLURM_ARRAY_TASK_ID={id}, SLURM_ARRAY_TASK_MIN={min}){tasks}"),
            }
        }
    };
    Ok((split.count > 1).then_some(split))
}

/// The split to use: the flags' (`--num-workers`, `--worker-index`, each
/// optional) and the launcher's must agree where both are given; either
/// alone is used; neither: one worker.
///
/// # Errors
/// Flags that disagree with the launcher, in one line that names both.
pub fn resolve(num_workers: Option<u32>, worker_index: Option<u32>, launcher: Option<&WorkerSplit>) -> Result<(u32, u32)> {
    let Some(l) = launcher else { return Ok((num_workers.unwrap_or(1), worker_index.unwrap_or(0))) };
    let (n, i) = (num_workers.unwrap_or(l.count), worker_index.unwrap_or(l.index));
    if (n, i) != (l.count, l.index) {
        return Err(ExtractError::Setting {
            flag: "--num-workers/--worker-index",
            value: format!("{n}/{i}"),
            expected: format!(
                "to agree with the launcher, worker {} of {} from {}; drop the flags or make them agree",
                l.index, l.count, l.source
            ),
        });
    }
    Ok((n, i))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(vars: &[(&str, &str)]) -> Result<Option<WorkerSplit>> {
        from_env(|k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string()))
    }

    fn of(vars: &[(&str, &str)]) -> (u32, u32) {
        let s = split(vars).expect("valid").expect("a split");
        (s.index, s.count)
    }

    #[test]
    fn launchers_give_the_worker_split() {
        assert_eq!(split(&[]).expect("ok"), None);
        assert_eq!(split(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1")]).expect("ok"), None, "one Slurm task");
        assert_eq!(of(&[("RANK", "3"), ("WORLD_SIZE", "8")]), (3, 8));
        assert_eq!(of(&[("RANK", "1"), ("WORLD_SIZE", "2"), ("SLURM_PROCID", "5"), ("SLURM_NTASKS", "9")]), (1, 2), "torchrun first");
        assert_eq!(of(&[("SLURM_PROCID", "5"), ("SLURM_NTASKS", "16")]), (5, 16));
        assert_eq!(
            of(&[("SLURM_ARRAY_TASK_ID", "3"), ("SLURM_ARRAY_TASK_COUNT", "8"), ("SLURM_NTASKS", "1"), ("SLURM_PROCID", "0")]),
            (3, 8)
        );
        // --array=1-8: ids from 1; --array=0-14:2: every other id
        assert_eq!(of(&[("SLURM_ARRAY_TASK_ID", "1"), ("SLURM_ARRAY_TASK_COUNT", "8"), ("SLURM_ARRAY_TASK_MIN", "1")]), (0, 8));
        let step =
            [("SLURM_ARRAY_TASK_ID", "6"), ("SLURM_ARRAY_TASK_COUNT", "8"), ("SLURM_ARRAY_TASK_MIN", "0"), ("SLURM_ARRAY_TASK_STEP", "2")];
        assert_eq!(of(&step), (3, 8));
        // an array of 4 tasks, each running srun with 2 tasks: 8 workers
        assert_eq!(
            of(&[("SLURM_ARRAY_TASK_ID", "2"), ("SLURM_ARRAY_TASK_COUNT", "4"), ("SLURM_PROCID", "1"), ("SLURM_NTASKS", "2")]),
            (5, 8)
        );
    }

    #[test]
    fn bad_variables_are_named() {
        let e = |vars: &[(&str, &str)]| split(vars).expect_err("bad").to_string();
        assert!(e(&[("RANK", "x"), ("WORLD_SIZE", "2")]).contains("RANK x"));
        assert!(e(&[("RANK", "2"), ("WORLD_SIZE", "2")]).contains("must be below WORLD_SIZE=2"));
        assert!(e(&[("WORLD_SIZE", "2")]).contains("RANK (unset): must be set when WORLD_SIZE is"));
        assert!(e(&[("SLURM_ARRAY_TASK_ID", "9"), ("SLURM_ARRAY_TASK_COUNT", "8")]).contains("SLURM_ARRAY_TASK_ID 9"));
        assert!(e(&[("SLURM_ARRAY_TASK_ID", "3")]).contains("SLURM_ARRAY_TASK_COUNT"));
    }

    #[test]
    fn flags_and_launcher_must_agree() {
        let l = WorkerSplit { index: 3, count: 8, source: "Slurm array task 3 of 8".into() };
        assert_eq!(resolve(None, None, None).expect("ok"), (1, 0));
        assert_eq!(resolve(Some(4), Some(2), None).expect("ok"), (4, 2));
        assert_eq!(resolve(None, None, Some(&l)).expect("ok"), (8, 3));
        assert_eq!(resolve(Some(8), None, Some(&l)).expect("ok"), (8, 3));
        let e = resolve(Some(4), Some(1), Some(&l)).expect_err("disagree").to_string();
        assert!(e.contains("4/1") && e.contains("worker 3 of 8") && e.contains("Slurm array"), "{e}");
    }
}

//! Turning pairwise judgments into pointwise scores, for many pools at once.
//!
//! - `all-pairs` (the paper): every pair judged; a candidate's score is its mean win rate.
//! - `pivot` (the paper's cheaper variant): every candidate against one pivot (the original
//!   suffix when the pool has it).
//! - `swiss`: rounds in which candidates with similar records meet; about n·log2(n)/2 calls.
//! - `sort`: a merge sort with the judge as comparator; score = normalised rank;
//!   about n·log2(n) − n calls, in log-depth rounds.
//! - `adaptive`: starts from a prior order (a pointwise judge's scores of the pool,
//!   `sip.tournament_prior`) and spends 2(n−1) calls where that order is least certain:
//!   neighbours whose prior scores are closest are compared first, a lost comparison swaps
//!   them, and the swap brings their new neighbours into question; score = normalised rank.
//!
//! Every design sends one batch per round across all pools, so a concurrent judge sees large
//! batches. A failed comparison is left out (never counted as a loss).

use crate::rng::SplitMix;

/// One comparison: pool, first candidate, second candidate.
pub type Match = (usize, usize, usize);

/// Judges a batch of matches: the probability that the first wins, or `None` when it failed.
pub trait Referee {
    fn judge(&mut self, matches: &[Match]) -> Vec<Option<f64>>;
}

impl<F: FnMut(&[Match]) -> Vec<Option<f64>>> Referee for F {
    fn judge(&mut self, matches: &[Match]) -> Vec<Option<f64>> {
        self(matches)
    }
}

/// Scores per pool per candidate (`None` when none of its comparisons succeeded), calls made.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub scores: Vec<Vec<Option<f64>>>,
    pub calls: usize,
    pub failures: usize,
}

crate::config::choice! {
    /// How pairwise judgments over a pool become scores (`sip.tournament`).
    Design {
        /// Every pair once: n(n-1)/2 calls.
        AllPairs = "all-pairs",
        /// Every candidate against the original suffix (or the first candidate): n-1 calls.
        Pivot = "pivot",
        /// Rounds pairing neighbours in the current ranking.
        Swiss = "swiss",
        /// A merge sort with the judge as comparator.
        Sort = "sort",
        /// Comparisons where a prior order (a pointwise judge's scores) is least certain:
        /// 2(n-1) calls.
        Adaptive = "adaptive",
    }
}

/// Comparisons per round and pool in the adaptive design (disjoint neighbour pairs).
const ADAPTIVE_PER_ROUND: usize = 4;

/// Wins and games per candidate.
struct Tally {
    wins: Vec<Vec<f64>>,
    games: Vec<Vec<usize>>,
    calls: usize,
    failures: usize,
}

impl Tally {
    fn new(sizes: &[usize]) -> Tally {
        Tally {
            wins: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            games: sizes.iter().map(|&n| vec![0; n]).collect(),
            calls: 0,
            failures: 0,
        }
    }

    fn play(&mut self, referee: &mut dyn Referee, matches: &[Match]) -> Vec<Option<f64>> {
        if matches.is_empty() {
            return Vec::new();
        }
        let results = referee.judge(matches);
        self.calls += matches.len();
        for (&(pool, a, b), r) in matches.iter().zip(&results) {
            match r {
                Some(p) => {
                    self.wins[pool][a] += p;
                    self.wins[pool][b] += 1.0 - p;
                    self.games[pool][a] += 1;
                    self.games[pool][b] += 1;
                }
                None => self.failures += 1,
            }
        }
        results
    }

    fn mean_scores(&self) -> Vec<Vec<Option<f64>>> {
        self.wins
            .iter()
            .zip(&self.games)
            .map(|(w, g)| {
                w.iter()
                    .zip(g)
                    .map(|(w, &g)| (g > 0).then(|| w / g as f64))
                    .collect()
            })
            .collect()
    }

    fn outcome(self, scores: Vec<Vec<Option<f64>>>) -> Outcome {
        Outcome {
            scores,
            calls: self.calls,
            failures: self.failures,
        }
    }
}

/// Run `design` over pools of the given sizes. `pivots[p]` is the pivot of pool p (for `pivot`;
/// candidate 0 when `None`); `priors[p]` the prior scores of pool p's candidates (for
/// `adaptive`; a missing one counts as the pool's mean, a missing pool as no information).
/// `rng` breaks ties and orders the first swiss round, pool by pool: pool `p` draws from its
/// own stream, keyed by `first_pool + p`, so a pool gets the same tournament in any split of
/// the pools (the shares of a job's ranks).
pub fn run(
    design: Design,
    sizes: &[usize],
    pivots: &[Option<usize>],
    priors: &[Vec<Option<f64>>],
    referee: &mut dyn Referee,
    rng: &SplitMix,
    first_pool: usize,
) -> Outcome {
    let mut tally = Tally::new(sizes);
    match design {
        Design::AllPairs => {
            let mut matches = Vec::new();
            for (p, &n) in sizes.iter().enumerate() {
                for a in 0..n {
                    for b in a + 1..n {
                        matches.push((p, a, b));
                    }
                }
            }
            tally.play(referee, &matches);
            let scores = tally.mean_scores();
            tally.outcome(scores)
        }
        Design::Pivot => {
            let mut matches = Vec::new();
            for (p, &n) in sizes.iter().enumerate() {
                let pivot = pivots.get(p).copied().flatten().unwrap_or(0);
                for c in (0..n).filter(|&c| c != pivot) {
                    matches.push((p, c, pivot));
                }
            }
            tally.play(referee, &matches);
            let scores = tally.mean_scores();
            tally.outcome(scores)
        }
        Design::Swiss => swiss(sizes, referee, rng, first_pool, tally),
        Design::Sort => merge_sort(sizes, referee, tally),
        Design::Adaptive => adaptive(sizes, priors, referee, tally),
    }
}

/// Scores from an order of each pool (rank 0 = best): `1 − rank / (n − 1)`.
fn rank_scores(orders: &[Vec<usize>], sizes: &[usize]) -> Vec<Vec<Option<f64>>> {
    orders
        .iter()
        .zip(sizes)
        .map(|(order, &n)| {
            let mut s = vec![None; n];
            for (rank, &c) in order.iter().enumerate() {
                s[c] = Some(if n > 1 {
                    1.0 - rank as f64 / (n - 1) as f64
                } else {
                    0.5
                });
            }
            s
        })
        .collect()
}

/// The adaptive design (see the module docs). Each round takes, in every pool, up to
/// [`ADAPTIVE_PER_ROUND`] disjoint neighbour pairs not compared yet, closest prior scores
/// first; a pair whose lower-ranked candidate wins swaps, and both take the mean of their
/// prior scores (the winner just above), so that their new neighbours become the closest
/// pairs. A failed comparison changes nothing and still counts against the budget.
fn adaptive(
    sizes: &[usize],
    priors: &[Vec<Option<f64>>],
    referee: &mut dyn Referee,
    mut tally: Tally,
) -> Outcome {
    let mut prior: Vec<Vec<f64>> = sizes
        .iter()
        .enumerate()
        .map(|(p, &n)| {
            let given: Vec<Option<f64>> = priors.get(p).cloned().unwrap_or_default();
            let known: Vec<f64> = given.iter().flatten().copied().collect();
            let mean = if known.is_empty() {
                0.0
            } else {
                known.iter().sum::<f64>() / known.len() as f64
            };
            (0..n)
                .map(|c| given.get(c).copied().flatten().unwrap_or(mean))
                .collect()
        })
        .collect();
    let mut orders: Vec<Vec<usize>> = prior
        .iter()
        .map(|pr| {
            let mut o: Vec<usize> = (0..pr.len()).collect();
            // Best first; equal priors keep the candidates' order.
            o.sort_by(|&a, &b| pr[b].total_cmp(&pr[a]).then(a.cmp(&b)));
            o
        })
        .collect();
    let mut left: Vec<usize> = sizes.iter().map(|&n| 2 * n.saturating_sub(1)).collect();
    let mut met: Vec<std::collections::HashSet<(usize, usize)>> =
        sizes.iter().map(|_| Default::default()).collect();
    loop {
        let mut matches: Vec<Match> = Vec::new();
        for p in 0..sizes.len() {
            let order = &orders[p];
            let mut open: Vec<(f64, usize)> = (0..order.len().saturating_sub(1))
                .filter(|&i| {
                    let (a, b) = (order[i], order[i + 1]);
                    !met[p].contains(&(a.min(b), a.max(b)))
                })
                .map(|i| ((prior[p][order[i]] - prior[p][order[i + 1]]).abs(), i))
                .collect();
            open.sort_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)));
            let mut taken: Vec<usize> = Vec::new();
            for (_, i) in open {
                if taken.len() >= ADAPTIVE_PER_ROUND.min(left[p]) {
                    break;
                }
                if taken.iter().any(|&t| t.abs_diff(i) <= 1) {
                    continue;
                }
                taken.push(i);
            }
            for i in taken {
                let (a, b) = (order[i], order[i + 1]);
                met[p].insert((a.min(b), a.max(b)));
                left[p] -= 1;
                matches.push((p, a, b));
            }
        }
        if matches.is_empty() {
            break;
        }
        let results = tally.play(referee, &matches);
        for (&(p, a, b), r) in matches.iter().zip(results) {
            // `a` stands just above `b`; it keeps its place unless `b` won.
            if r.is_some_and(|first| first < 0.5) {
                let i = orders[p].iter().position(|&c| c == a).unwrap_or(0);
                orders[p].swap(i, i + 1);
                let mid = (prior[p][a] + prior[p][b]) / 2.0;
                let eps = 1e-9 * mid.abs().max(1.0);
                prior[p][b] = mid + eps;
                prior[p][a] = mid - eps;
            }
        }
    }
    let scores = rank_scores(&orders, sizes);
    tally.outcome(scores)
}

fn swiss(
    sizes: &[usize],
    referee: &mut dyn Referee,
    rng: &SplitMix,
    first_pool: usize,
    mut tally: Tally,
) -> Outcome {
    let max_n = sizes.iter().copied().max().unwrap_or(0);
    let rounds = if max_n < 2 {
        0
    } else {
        (max_n as f64).log2().ceil() as usize + 1
    };
    let mut met: Vec<std::collections::HashSet<(usize, usize)>> =
        sizes.iter().map(|_| Default::default()).collect();
    // Random tie-break keys, fixed for the tournament.
    let base = rng.clone().next_u64();
    let keys: Vec<Vec<u64>> = sizes
        .iter()
        .enumerate()
        .map(|(p, &n)| {
            let mut pool_rng = SplitMix::derive(base, 0x5E15, (first_pool + p) as u64);
            (0..n).map(|_| pool_rng.next_u64()).collect()
        })
        .collect();
    for _ in 0..rounds {
        let mut matches = Vec::new();
        for (p, &n) in sizes.iter().enumerate() {
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| {
                tally.wins[p][b]
                    .total_cmp(&tally.wins[p][a])
                    .then(keys[p][a].cmp(&keys[p][b]))
            });
            let mut free = order;
            while free.len() >= 2 {
                let a = free.remove(0);
                // The nearest-ranked opponent not met yet (a rematch only if all were met).
                let pick = free
                    .iter()
                    .position(|&b| !met[p].contains(&(a.min(b), a.max(b))))
                    .unwrap_or(0);
                let b = free.remove(pick);
                met[p].insert((a.min(b), a.max(b)));
                matches.push((p, a, b));
            }
        }
        tally.play(referee, &matches);
    }
    let scores = tally.mean_scores();
    tally.outcome(scores)
}

/// Bottom-up merge sort of every pool at once; each round asks one comparison of every active
/// merge. A failed comparison keeps the left element first (stable), counted as a failure.
fn merge_sort(sizes: &[usize], referee: &mut dyn Referee, mut tally: Tally) -> Outcome {
    struct Merge {
        pool: usize,
        left: Vec<usize>,
        right: Vec<usize>,
        out: Vec<usize>,
    }
    let mut runs: Vec<Vec<Vec<usize>>> = sizes
        .iter()
        .map(|&n| (0..n).map(|i| vec![i]).collect())
        .collect();
    loop {
        let mut merges = Vec::new();
        for (p, pool_runs) in runs.iter_mut().enumerate() {
            let taken = std::mem::take(pool_runs);
            let mut it = taken.into_iter();
            while let Some(left) = it.next() {
                match it.next() {
                    Some(right) => merges.push(Merge {
                        pool: p,
                        left,
                        right,
                        out: Vec::new(),
                    }),
                    None => pool_runs.push(left),
                }
            }
        }
        if merges.is_empty() {
            break;
        }
        // Merge all pairs of runs in lockstep.
        loop {
            let active: Vec<usize> = (0..merges.len())
                .filter(|&m| !merges[m].left.is_empty() && !merges[m].right.is_empty())
                .collect();
            if active.is_empty() {
                break;
            }
            let matches: Vec<Match> = active
                .iter()
                .map(|&m| (merges[m].pool, merges[m].left[0], merges[m].right[0]))
                .collect();
            let results = tally.play(referee, &matches);
            for (&m, r) in active.iter().zip(results) {
                let merge = &mut merges[m];
                // The better candidate goes first (rank 0 = best).
                let left_first = r.map(|p| p >= 0.5).unwrap_or(true);
                let next = if left_first {
                    merge.left.remove(0)
                } else {
                    merge.right.remove(0)
                };
                merge.out.push(next);
            }
        }
        for mut merge in merges {
            merge.out.append(&mut merge.left);
            merge.out.append(&mut merge.right);
            runs[merge.pool].push(merge.out);
        }
    }
    let orders: Vec<Vec<usize>> = runs
        .into_iter()
        .map(|pool_runs| pool_runs.into_iter().next().unwrap_or_default())
        .collect();
    let scores = rank_scores(&orders, sizes);
    tally.outcome(scores)
}

/// Kendall's tau-b between two score lists (candidates with a `None` are left out).
pub fn kendall_tau(a: &[Option<f64>], b: &[Option<f64>]) -> Option<f64> {
    let pairs: Vec<(f64, f64)> = a
        .iter()
        .zip(b)
        .filter_map(|(x, y)| Some(((*x)?, (*y)?)))
        .collect();
    let (mut concordant, mut discordant, mut ties_a, mut ties_b) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    for i in 0..pairs.len() {
        for j in i + 1..pairs.len() {
            let da = pairs[i].0 - pairs[j].0;
            let db = pairs[i].1 - pairs[j].1;
            if da == 0.0 && db == 0.0 {
                continue;
            } else if da == 0.0 {
                ties_a += 1.0;
            } else if db == 0.0 {
                ties_b += 1.0;
            } else if da.signum() == db.signum() {
                concordant += 1.0;
            } else {
                discordant += 1.0;
            }
        }
    }
    let denom = ((concordant + discordant + ties_a) * (concordant + discordant + ties_b)).sqrt();
    (denom > 0.0).then(|| (concordant - discordant) / denom)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A referee that prefers the candidate with the higher hidden quality.
    fn exact(quality: Vec<Vec<f64>>) -> impl FnMut(&[Match]) -> Vec<Option<f64>> {
        move |ms: &[Match]| {
            ms.iter()
                .map(|&(p, a, b)| {
                    Some(if quality[p][a] > quality[p][b] {
                        1.0
                    } else {
                        0.0
                    })
                })
                .collect()
        }
    }

    fn qualities() -> Vec<Vec<f64>> {
        vec![
            vec![0.3, 0.9, 0.1, 0.5, 0.7, 0.2, 0.8, 0.4],
            vec![0.5, 0.1, 0.9],
        ]
    }

    #[test]
    fn all_pairs_counts_and_ranks() {
        let q = qualities();
        let out = run(
            Design::AllPairs,
            &[8, 3],
            &[None, None],
            &[],
            &mut exact(q.clone()),
            &SplitMix::new(0),
            0,
        );
        assert_eq!(out.calls, 28 + 3);
        assert_eq!(out.scores[1], vec![Some(0.5), Some(0.0), Some(1.0)]);
        let truth: Vec<Option<f64>> = q[0].iter().map(|&x| Some(x)).collect();
        assert_eq!(kendall_tau(&out.scores[0], &truth), Some(1.0));
    }

    #[test]
    fn sort_recovers_the_order_with_fewer_calls() {
        let q = qualities();
        let out = run(
            Design::Sort,
            &[8, 3],
            &[None, None],
            &[],
            &mut exact(q.clone()),
            &SplitMix::new(0),
            0,
        );
        assert!(out.calls < 28 + 3, "{}", out.calls);
        let truth: Vec<Option<f64>> = q[0].iter().map(|&x| Some(x)).collect();
        assert_eq!(kendall_tau(&out.scores[0], &truth), Some(1.0));
        assert_eq!(out.scores[1], vec![Some(0.5), Some(0.0), Some(1.0)]);
    }

    #[test]
    fn swiss_is_cheaper_and_agrees_well() {
        let q = qualities();
        let out = run(
            Design::Swiss,
            &[8, 3],
            &[None, None],
            &[],
            &mut exact(q.clone()),
            &SplitMix::new(3),
            0,
        );
        assert!(out.calls < 31, "{}", out.calls);
        let truth: Vec<Option<f64>> = q[0].iter().map(|&x| Some(x)).collect();
        assert!(kendall_tau(&out.scores[0], &truth).unwrap() > 0.6);
    }

    #[test]
    fn pivot_compares_against_one_candidate() {
        let q = qualities();
        let out = run(
            Design::Pivot,
            &[8, 3],
            &[Some(3), None],
            &[],
            &mut exact(q),
            &SplitMix::new(0),
            0,
        );
        assert_eq!(out.calls, 7 + 2);
        assert_eq!(out.scores[0][1], Some(1.0)); // 0.9 beats the pivot 0.5
        assert_eq!(out.scores[0][0], Some(0.0)); // 0.3 loses to it
    }

    #[test]
    fn failures_are_left_out() {
        let mut failing = |ms: &[Match]| {
            ms.iter()
                .map(|&(_, a, _)| (a != 0).then_some(1.0))
                .collect::<Vec<_>>()
        };
        let out = run(
            Design::AllPairs,
            &[3],
            &[None],
            &[],
            &mut failing,
            &SplitMix::new(0),
            0,
        );
        assert_eq!(out.failures, 2);
        assert_eq!(out.scores[0], vec![None, Some(1.0), Some(0.0)]);
    }

    #[test]
    fn adaptive_repairs_a_noisy_prior_within_its_budget() {
        let q = qualities();
        let truth: Vec<Option<f64>> = q[0].iter().map(|&x| Some(x)).collect();
        // An exact prior needs no repair: every comparison confirms it.
        let exact_prior: Vec<Vec<Option<f64>>> = q
            .iter()
            .map(|pool| pool.iter().map(|&x| Some(x)).collect())
            .collect();
        let out = run(
            Design::Adaptive,
            &[8, 3],
            &[None, None],
            &exact_prior,
            &mut exact(q.clone()),
            &SplitMix::new(0),
            0,
        );
        assert_eq!(kendall_tau(&out.scores[0], &truth), Some(1.0));
        assert_eq!(out.scores[1], vec![Some(0.5), Some(0.0), Some(1.0)]);
        assert!(out.calls <= 2 * 7 + 2 * 2, "{}", out.calls);
        // Neighbours swapped in the prior (and one candidate without a prior) are put right
        // by comparisons, and never more than 2(n-1) of them per pool.
        let mut noisy = exact_prior.clone();
        noisy[0].swap(0, 7); // 0.3 <-> 0.4: neighbours in the true order
        noisy[0].swap(4, 6); // 0.7 <-> 0.8
        noisy[1][2] = None;
        let out = run(
            Design::Adaptive,
            &[8, 3],
            &[None, None],
            &noisy,
            &mut exact(q.clone()),
            &SplitMix::new(0),
            0,
        );
        assert_eq!(kendall_tau(&out.scores[0], &truth), Some(1.0));
        assert_eq!(out.scores[1], vec![Some(0.5), Some(0.0), Some(1.0)]);
        assert!(out.calls <= 2 * 7 + 2 * 2, "{}", out.calls);
        let before = kendall_tau(&noisy[0], &truth).unwrap();
        assert!(before < 1.0);
    }
}

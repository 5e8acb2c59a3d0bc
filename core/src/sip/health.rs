//! Health: monitors that tell, while a run goes, that the judge is being gamed or has stopped
//! working — computed every step from what the step already has. A text-property judge can be
//! satisfied by text that is no better (the policy's own rollouts winning every pool, or
//! collapsing into repetition); a judge that fails, disagrees with itself across orders or
//! gives every candidate the same reward teaches nothing. Each monitor averages over the last
//! `health.window` steps and alarms when the average crosses its threshold.

use super::batch::Batch;
use super::observe::{mean_std, SourceStats};
use super::pool::Pool;
use super::update::Updated;
use serde::{Deserialize, Serialize};
use sipt_api::Source;
use sipt_experiment::config::{HealthAction, HealthSection};
use sipt_experiment::metrics::Row;
use sipt_experiment::plugins::JudgeStats;
use std::collections::{BTreeMap, HashSet, VecDeque};

/// Which side of its threshold is bad.
#[derive(Clone, Copy)]
enum Bad {
    Above(f64),
    Below(f64),
    Outside(f64, f64),
}

impl Bad {
    fn crossed(self, x: f64) -> bool {
        match self {
            Bad::Above(t) => x > t,
            Bad::Below(t) => x < t,
            Bad::Outside(lo, hi) => x < lo || x > hi,
        }
    }

    fn describe(self) -> String {
        match self {
            Bad::Above(t) => format!("above {t}"),
            Bad::Below(t) => format!("below {t}"),
            Bad::Outside(lo, hi) => format!("outside [{lo:.3}, {hi:.3}]"),
        }
    }
}

/// One monitor: its metric name, what it means, and its threshold (`None`: logged only).
struct Monitor {
    name: String,
    what: String,
    bad: Option<Bad>,
    values: VecDeque<f64>,
    /// The step since which it is alarming.
    since: Option<u64>,
}

/// A monitor's window and alarm as a checkpoint keeps them, so that a resumed run alarms (and
/// stops) exactly where the uninterrupted one would.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Window {
    values: Vec<f64>,
    since: Option<u64>,
}

/// The monitors of a run.
pub struct Health {
    config: HealthSection,
    monitors: BTreeMap<String, Monitor>,
    /// Monitors that started alarming at the last step observed.
    started: usize,
}

/// One step's monitor values, by metric name (under `health/`).
pub type Values = Vec<(String, f64)>;

/// Distinct n-grams per n-gram, averaged over sequences (1 = no repeated n-gram).
fn distinct(sequences: &[&[u32]], n: usize) -> Option<f64> {
    let shares: Vec<f64> = sequences
        .iter()
        .filter(|s| s.len() >= n)
        .map(|s| {
            let grams: Vec<&[u32]> = s.windows(n).collect();
            let unique: HashSet<&[u32]> = grams.iter().copied().collect();
            unique.len() as f64 / grams.len() as f64
        })
        .collect();
    mean(&shares)
}

fn mean(xs: &[f64]) -> Option<f64> {
    (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64)
}

/// This step's values of every monitor that has one.
pub fn measure(
    pools: &[Pool],
    batch: &Batch,
    stats: &SourceStats,
    judges: &JudgeStats,
    counters: &[(String, f64)],
    updated: &Updated,
) -> Values {
    let originals: Vec<&[u32]> = batch.cuts.iter().map(|c| c.suffix.as_slice()).collect();
    let mut v = Values::new();
    for (source, share) in &stats.chosen_rate {
        v.push((format!("chosen_share/{source}"), *share));
    }
    let rollout_tokens: Vec<&[u32]> = pools
        .iter()
        .flatten()
        .filter(|c| c.source == Source::Rollout)
        .map(|c| c.tokens.as_slice())
        .collect();
    let rollout_chars: Vec<f64> = pools
        .iter()
        .flatten()
        .filter(|c| c.source == Source::Rollout)
        .map(|c| c.text.chars().count() as f64)
        .collect();
    if let (Some(ours), Some(theirs)) = (distinct(&rollout_tokens, 2), distinct(&originals, 2)) {
        v.push(("rollout_distinct2".into(), ours));
        if theirs > 0.0 {
            v.push(("distinct_ratio".into(), ours / theirs));
        }
    }
    if let Some(d1) = distinct(&rollout_tokens, 1) {
        v.push(("rollout_repetition".into(), 1.0 - d1));
    }
    let original_chars: Vec<f64> = batch
        .suffixes
        .iter()
        .map(|t| t.chars().count() as f64)
        .collect();
    if let (Some(ours), Some(theirs)) = (mean(&rollout_chars), mean(&original_chars)) {
        if theirs > 0.0 {
            v.push(("length_ratio".into(), ours / theirs));
        }
    }
    if let Some(kl) = updated.kl {
        v.push(("kl".into(), kl));
    }
    let (calls, failures) = judges
        .values()
        .fold((0, 0), |(c, f), (calls, fails)| (c + calls, f + fails));
    if calls > 0 {
        v.push(("judge_failure_rate".into(), failures as f64 / calls as f64));
    }
    let disagreement = counters
        .iter()
        .filter(|(k, _)| k.starts_with("judge/") && k.ends_with("/total/agreement"))
        .map(|(_, agreement)| 1.0 - agreement)
        .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
    if let Some(d) = disagreement {
        v.push(("order_disagreement".into(), d));
    }
    let spreads: Vec<f64> = pools
        .iter()
        .map(|p| p.iter().filter_map(|c| c.reward).collect::<Vec<f64>>())
        .filter(|r| r.len() >= 2)
        .map(|r| mean_std(&r).1)
        .collect();
    if let Some(spread) = mean(&spreads) {
        v.push(("reward_spread".into(), spread));
    }
    if let (Some((r, _)), Some((o, _))) = (
        stats.reward.get(&Source::Rollout),
        stats.reward.get(&Source::Original),
    ) {
        v.push(("reward_gap".into(), r - o));
    }
    v
}

impl Health {
    pub fn new(config: &HealthSection) -> Health {
        Health::restore(config, &BTreeMap::new())
    }

    /// Monitors with the windows a checkpoint kept ([`Health::windows`]). A window longer than
    /// `health.window` (the file changed between runs) keeps its newest values.
    pub fn restore(config: &HealthSection, windows: &BTreeMap<String, Window>) -> Health {
        let mut health = Health {
            config: config.clone(),
            monitors: BTreeMap::new(),
            started: 0,
        };
        let keep = config.window.max(1) as usize;
        for (name, w) in windows {
            let (what, bad) = health.rule(name);
            let skip = w.values.len().saturating_sub(keep);
            let monitor = Monitor {
                name: name.clone(),
                what,
                bad,
                values: w.values[skip..].iter().copied().collect(),
                since: w.since.filter(|_| bad.is_some()),
            };
            health.monitors.insert(name.clone(), monitor);
        }
        health
    }

    /// Every monitor's window and alarm, for a checkpoint.
    pub fn windows(&self) -> BTreeMap<String, Window> {
        self.monitors
            .iter()
            .map(|(name, m)| {
                let w = Window {
                    values: m.values.iter().copied().collect(),
                    since: m.since,
                };
                (name.clone(), w)
            })
            .collect()
    }

    /// What a metric means and which side of which threshold is bad.
    fn rule(&self, name: &str) -> (String, Option<Bad>) {
        let c = &self.config;
        match name {
            n if n.starts_with("chosen_share/") => (
                format!(
                    "source dominance: the {} chosen in a share of selected pools",
                    n.trim_start_matches("chosen_share/")
                ),
                Some(Bad::Above(c.max_source_share)),
            ),
            "distinct_ratio" => (
                "rollout degeneration: distinct bigrams of rollouts over those of the original suffixes".into(),
                Some(Bad::Below(c.min_distinct_ratio)),
            ),
            "length_ratio" => (
                "rollout degeneration: rollout length over the original suffixes'".into(),
                Some(Bad::Outside(1.0 / c.max_length_ratio, c.max_length_ratio)),
            ),
            "kl" => (
                "divergence: per-token KL estimate of chosen continuations from the reference".into(),
                Some(Bad::Above(c.max_kl)),
            ),
            "judge_failure_rate" => (
                "judge failures per call".into(),
                Some(Bad::Above(c.max_judge_failure_rate)),
            ),
            "order_disagreement" => (
                "judge position bias: disagreement between the two orders".into(),
                Some(Bad::Above(c.max_order_disagreement)),
            ),
            "reward_spread" => (
                "reward collapse: spread of rewards within a pool".into(),
                Some(Bad::Below(c.min_reward_spread)),
            ),
            "reward_gap" => (
                "reward gap: rollouts' mean reward over the original suffixes'".into(),
                Some(Bad::Above(c.max_reward_gap)),
            ),
            other => (other.to_string(), None),
        }
    }

    /// Fold in step `step`'s values: log each under `health/` with its alarm flag, count the
    /// alarms, and return a line for each monitor that started or stopped alarming.
    pub fn observe(&mut self, step: u64, values: Values, row: &mut Row) -> Vec<String> {
        let window = self.config.window.max(1) as usize;
        let mut changes = Vec::new();
        self.started = 0;
        for (name, value) in values {
            if !self.monitors.contains_key(&name) {
                let (what, bad) = self.rule(&name);
                let monitor = Monitor {
                    name: name.clone(),
                    what,
                    bad,
                    values: VecDeque::new(),
                    since: None,
                };
                self.monitors.insert(name.clone(), monitor);
            }
            let Some(m) = self.monitors.get_mut(&name) else {
                continue;
            };
            m.values.push_back(value);
            if m.values.len() > window {
                m.values.pop_front();
            }
            row.set(format!("health/{}", m.name), value);
            let Some(bad) = m.bad else { continue };
            let average = m.values.iter().sum::<f64>() / m.values.len() as f64;
            let alarm = m.values.len() == window && bad.crossed(average);
            match (alarm, m.since) {
                (true, None) => {
                    m.since = Some(step);
                    self.started += 1;
                    changes.push(format!(
                            "health: {} is {average:.3} over the last {window} steps, {} (health/{}), since step {step}",
                            m.what,
                            bad.describe(),
                            m.name
                        ));
                }
                (false, Some(since)) => {
                    m.since = None;
                    changes.push(format!(
                            "health: {} is back within its threshold at step {step} ({average:.3}; it alarmed from step {since})",
                            m.what
                        ));
                }
                _ => {}
            }
            row.set(
                format!("health/{}/alarm", m.name),
                if m.since.is_some() { 1.0 } else { 0.0 },
            );
        }
        row.set("health/alarms", self.alarming().len() as f64);
        changes
    }

    /// The monitors alarming now, with the step each started.
    pub fn alarming(&self) -> Vec<(&str, u64)> {
        self.monitors
            .values()
            .filter_map(|m| m.since.map(|s| (m.name.as_str(), s)))
            .collect()
    }

    /// Whether the run should stop now: `health.action = "stop"` and a monitor started
    /// alarming at the last step. An alarm carried over a resume does not stop the run again
    /// (the researcher resumed it knowing); one that starts later does.
    pub fn stop(&self) -> bool {
        self.config.enabled && self.config.action == HealthAction::Stop && self.started > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(window: u64) -> HealthSection {
        HealthSection {
            window,
            ..HealthSection::default()
        }
    }

    #[test]
    fn an_alarm_needs_a_full_window_over_its_threshold_and_clears() {
        let mut h = Health::new(&config(3));
        let share = |x: f64| vec![("chosen_share/rollout".to_string(), x)];
        let mut alarms = Vec::new();
        for (step, x) in [1.0, 1.0, 1.0, 1.0, 0.0, 0.0].into_iter().enumerate() {
            let mut row = Row::new(step as u64 + 1);
            let changes = h.observe(step as u64 + 1, share(x), &mut row);
            alarms.push(row.get("health/chosen_share/rollout/alarm").unwrap());
            if step == 2 {
                assert_eq!(changes.len(), 1);
                assert!(changes[0].contains("since step 3"), "{}", changes[0]);
            }
        }
        // Steps 1-2: window not full; 3-4: mean 1.0 > 0.9; 5: mean 2/3; 6: 1/3.
        assert_eq!(alarms, vec![0.0, 0.0, 1.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn distinct_bigrams_see_repetition() {
        let varied: &[u32] = &[1, 2, 3, 4, 5];
        let looped: &[u32] = &[7, 7, 7, 7, 7];
        assert_eq!(distinct(&[varied], 2), Some(1.0));
        assert_eq!(distinct(&[looped], 2), Some(0.25));
        assert_eq!(distinct(&[], 2), None);
    }

    #[test]
    fn stop_only_when_asked() {
        let mut warn = Health::new(&config(1));
        let mut stop = Health::new(&HealthSection {
            action: HealthAction::Stop,
            ..config(1)
        });
        for h in [&mut warn, &mut stop] {
            h.observe(1, vec![("reward_spread".into(), 0.0)], &mut Row::new(1));
        }
        assert!(!warn.stop());
        assert!(stop.stop());
        // Still alarming a step later: the run stopped at the first step, and a resumed one
        // carrying the alarm goes on.
        let mut resumed = Health::restore(&stop.config, &stop.windows());
        resumed.observe(2, vec![("reward_spread".into(), 0.0)], &mut Row::new(2));
        assert!(!resumed.alarming().is_empty());
        assert!(!resumed.stop());
    }

    #[test]
    fn restored_windows_alarm_where_the_uninterrupted_run_does() {
        let values = [1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0];
        let feed = |h: &mut Health, from: usize, to: usize| -> Vec<Vec<String>> {
            (from..to)
                .map(|i| {
                    let mut row = Row::new(i as u64 + 1);
                    let v = vec![("chosen_share/rollout".to_string(), values[i])];
                    h.observe(i as u64 + 1, v, &mut row)
                })
                .collect()
        };
        let whole = feed(&mut Health::new(&config(3)), 0, values.len());
        let mut first = Health::new(&config(3));
        let mut resumed = feed(&mut first, 0, 5);
        let json = serde_json::to_value(first.windows()).unwrap();
        let mut second = Health::restore(&config(3), &serde_json::from_value(json).unwrap());
        assert_eq!(second.alarming(), first.alarming());
        resumed.extend(feed(&mut second, 5, values.len()));
        assert_eq!(resumed, whole);
        assert!(
            whole.iter().any(|c| !c.is_empty()),
            "the series alarms somewhere"
        );
    }
}

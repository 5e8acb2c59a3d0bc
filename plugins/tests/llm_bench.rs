//! Throughput of `llm-pairwise` against a loopback stand-in server with a fixed latency, against
//! the ideal for the configured concurrency (concurrency / latency). It prints figures and is
//! not a timed test:
//!
//!     cargo test -p sipt-plugins --test llm_bench -- --ignored --nocapture
//!
//! Options by environment: SIPT_BENCH_LATENCY_MS (200), SIPT_BENCH_CONCURRENCY (32, or a
//! comma-separated list), SIPT_BENCH_PAIRS (20 per unit of concurrency).

mod common;

use common::*;
use serde_json::json;
use sipt_api::{PairwiseItem, PairwiseJudge};
use std::time::{Duration, Instant};

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn pairwise_throughput_against_the_ideal() {
    let latency_ms: u64 = env_or("SIPT_BENCH_LATENCY_MS", "200").parse().unwrap();
    let latency = Duration::from_millis(latency_ms);
    let server = StandIn::start(move |_| {
        std::thread::sleep(latency);
        ok(chat_reply(
            "Option 1 reads on naturally.\nConclusion: Option 1",
        ))
    });
    let (_dir, ctx) = context();
    for concurrency in env_or("SIPT_BENCH_CONCURRENCY", "32").split(',') {
        let concurrency: usize = concurrency.trim().parse().unwrap();
        let pairs: usize = env_or("SIPT_BENCH_PAIRS", &(20 * concurrency).to_string())
            .parse()
            .unwrap();
        let config = config(
            &[&server.base],
            json!({"order": "fixed", "samples": 1, "cache": false, "concurrency": concurrency}),
        );
        let judge = pairwise_judge(&config, &ctx);
        let items: Vec<PairwiseItem> = (0..pairs)
            .map(|i| PairwiseItem {
                prefix: format!("Benchmark document {i}."),
                first: format!(" first continuation {i}"),
                second: format!(" second continuation {i}"),
                reference: None,
            })
            .collect();
        // Warm the connection pool, as in a run's later steps.
        judge.compare(&items[..concurrency.min(pairs)]);
        let started = Instant::now();
        let results = judge.compare(&items);
        let seconds = started.elapsed().as_secs_f64();
        let failed = results.iter().filter(|r| r.is_err()).count();
        assert_eq!(failed, 0, "{:?}", results.iter().find(|r| r.is_err()));
        let rate = pairs as f64 / seconds;
        let ideal = concurrency as f64 / latency.as_secs_f64();
        println!(
            "llm-pairwise: {pairs} pairs, concurrency {concurrency}, latency {latency_ms} ms: \
{seconds:.2} s, {rate:.1} pairs/s, ideal {ideal:.1} pairs/s, ratio {:.1}%",
            100.0 * rate / ideal
        );
    }
}

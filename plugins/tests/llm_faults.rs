//! The LLM plugins against a scripted loopback stand-in server: failures, retries, deadlines,
//! concurrency, rate limits, load balancing, caching, prompts, parsing and pairwise orders.
//! Every server binds 127.0.0.1 and every loop is bounded; no test needs the network.

mod common;

use common::*;
use serde_json::json;
use sipt_api::{PairwiseItem, PairwiseJudge, PointwiseItem, PointwiseJudge, RewriteItem, Rewriter};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn items(n: usize) -> Vec<PointwiseItem> {
    (0..n)
        .map(|i| PointwiseItem {
            prefix: format!("Document {i} begins here."),
            candidate: format!(" Candidate number {i}."),
            reference: Some(format!(" Reference {i}.")),
        })
        .collect()
}

fn safety(endpoints: &[&str], extra: serde_json::Value) -> serde_json::Value {
    let mut c = config(endpoints, extra);
    c["criterion"] = json!("safety");
    c
}

#[test]
fn garbage_json_is_a_failure_and_not_retried() {
    let server = StandIn::start(|_| ok("this is {not json".into()));
    let (_dir, ctx) = context();
    let judge = pointwise_judge(&safety(&[&server.base], json!({})), &ctx);
    let verdicts = judge.judge(&items(3));
    assert!(verdicts.iter().all(|v| v.is_err()), "{verdicts:?}");
    assert!(verdicts[0]
        .as_ref()
        .unwrap_err()
        .reason
        .contains("malformed response"));
    let c = judge.counters();
    assert_eq!(counter(&c, "failures"), 3.0);
    assert_eq!(counter(&c, "requests"), 3.0);
    assert_eq!(counter(&c, "retries"), 0.0);
    assert_eq!(counter(&c, "bad_responses"), 3.0);
    assert_eq!(server.count(), 3);
}

#[test]
fn server_errors_are_retried_then_counted_as_failures() {
    let server = StandIn::start(|_| status(500, &[]));
    let (_dir, ctx) = context();
    let judge = pointwise_judge(&safety(&[&server.base], json!({"max_retries": 2})), &ctx);
    let verdicts = judge.judge(&items(2));
    assert!(verdicts.iter().all(|v| v.is_err()));
    assert!(verdicts[0]
        .as_ref()
        .unwrap_err()
        .reason
        .contains("gave up after 3 attempts"));
    let c = judge.counters();
    assert_eq!(server.count(), 6, "1 attempt + 2 retries per item");
    assert_eq!(counter(&c, "retries"), 4.0);
    assert_eq!(counter(&c, "server_errors"), 6.0);
    assert_eq!(counter(&c, "failures"), 2.0);
}

#[test]
fn a_server_error_then_success_recovers() {
    // Every other request fails; one at a time so each item sees one failure.
    let server = StandIn::start(|r| {
        if r.index % 2 == 0 {
            status(503, &[])
        } else {
            ok(chat_reply("Fine.\nFINAL DECISION: YES"))
        }
    });
    let (_dir, ctx) = context();
    let judge = pointwise_judge(&safety(&[&server.base], json!({"concurrency": 1})), &ctx);
    let verdicts = judge.judge(&items(2));
    assert!(
        verdicts
            .iter()
            .all(|v| v.as_ref().map(|s| s["safety"]) == Ok(1.0)),
        "{verdicts:?}"
    );
    let c = judge.counters();
    assert_eq!(counter(&c, "retries"), 2.0);
    assert_eq!(counter(&c, "failures"), 0.0);
}

#[test]
fn rate_limited_requests_honour_retry_after() {
    let server = StandIn::start(|r| {
        if r.index == 0 {
            status(429, &[("Retry-After", "1")])
        } else {
            ok(chat_reply("FINAL DECISION: NO"))
        }
    });
    let (_dir, ctx) = context();
    let judge = pointwise_judge(
        &safety(&[&server.base], json!({"backoff_max_s": 5.0})),
        &ctx,
    );
    let started = Instant::now();
    let verdicts = judge.judge(&items(1));
    let elapsed = started.elapsed();
    assert_eq!(verdicts[0].as_ref().map(|s| s["safety"]), Ok(0.0));
    assert!(elapsed >= Duration::from_millis(950), "waited {elapsed:?}");
    assert!(elapsed < Duration::from_secs(4), "waited {elapsed:?}");
    let c = judge.counters();
    assert_eq!(
        (counter(&c, "rate_limited"), counter(&c, "retries")),
        (1.0, 1.0)
    );
}

#[test]
fn rate_limited_requests_without_retry_after_back_off() {
    let server = StandIn::start(|r| {
        if r.index < 2 {
            status(429, &[])
        } else {
            ok(chat_reply("FINAL DECISION: YES"))
        }
    });
    let (_dir, ctx) = context();
    let config = safety(
        &[&server.base],
        json!({"backoff_initial_s": 0.2, "backoff_max_s": 0.3, "max_retries": 3}),
    );
    let judge = pointwise_judge(&config, &ctx);
    let started = Instant::now();
    let verdicts = judge.judge(&items(1));
    let elapsed = started.elapsed();
    assert!(verdicts[0].is_ok(), "{verdicts:?}");
    // Two backoffs: at least half of 0.2 s and half of 0.3 s (equal jitter), at most 0.5 s.
    assert!(elapsed >= Duration::from_millis(250), "waited {elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "waited {elapsed:?}");
    let c = judge.counters();
    assert_eq!(
        (counter(&c, "rate_limited"), counter(&c, "retries")),
        (2.0, 2.0)
    );
}

#[test]
fn dropped_connections_are_retried() {
    let server = StandIn::start(|r| {
        if r.index < 2 {
            Action::Drop
        } else {
            ok(chat_reply("FINAL DECISION: YES"))
        }
    });
    let (_dir, ctx) = context();
    let judge = pointwise_judge(&safety(&[&server.base], json!({"concurrency": 1})), &ctx);
    let verdicts = judge.judge(&items(1));
    assert!(verdicts[0].is_ok(), "{verdicts:?}");
    let c = judge.counters();
    assert_eq!(counter(&c, "retries"), 2.0);
    assert_eq!(counter(&c, "connection_errors"), 2.0);

    // Always dropped: the retries run out and the judgment fails.
    let server = StandIn::start(|_| Action::Drop);
    let judge = pointwise_judge(&safety(&[&server.base], json!({"cache": false})), &ctx);
    let verdicts = judge.judge(&items(1));
    assert!(verdicts[0]
        .as_ref()
        .unwrap_err()
        .reason
        .contains("connection error"));
    assert_eq!(server.count(), 3);
}

#[test]
fn client_errors_are_not_retried() {
    let server = StandIn::start(|_| status(400, &[]));
    let (_dir, ctx) = context();
    let judge = pointwise_judge(&safety(&[&server.base], json!({})), &ctx);
    let verdicts = judge.judge(&items(2));
    assert!(verdicts
        .iter()
        .all(|v| v.as_ref().unwrap_err().reason.contains("HTTP 400")));
    let c = judge.counters();
    assert_eq!(
        (counter(&c, "retries"), counter(&c, "http_errors")),
        (0.0, 2.0)
    );
    assert_eq!(server.count(), 2);
}

#[test]
fn a_stalled_server_times_out_without_retries() {
    let server = StandIn::start(|_| Action::Stall(Duration::from_secs(60)));
    let (_dir, ctx) = context();
    let config = safety(
        &[&server.base],
        json!({"request_timeout_s": 0.5, "samples": 2}),
    );
    let judge = pointwise_judge(&config, &ctx);
    let started = Instant::now();
    let verdicts = judge.judge(&items(3));
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");
    assert!(verdicts
        .iter()
        .all(|v| v.as_ref().unwrap_err().reason.contains("timed out")));
    let c = judge.counters();
    assert_eq!(counter(&c, "timeouts"), 6.0);
    assert_eq!(counter(&c, "retries"), 0.0);
    assert_eq!(counter(&c, "failures"), 3.0);
}

#[test]
fn the_batch_deadline_cuts_stalled_requests_and_frees_their_slots() {
    let server = StandIn::start(|r| {
        if r.prompt().contains("STALL") {
            Action::Stall(Duration::from_secs(60))
        } else {
            ok(chat_reply("FINAL DECISION: YES"))
        }
    });
    let (_dir, ctx) = context();
    let config = safety(
        &[&server.base],
        json!({"request_timeout_s": 60.0, "deadline_s": 1.0, "concurrency": 2, "samples": 2}),
    );
    let judge = pointwise_judge(&config, &ctx);
    let stalled: Vec<PointwiseItem> = items(4)
        .into_iter()
        .map(|mut i| {
            i.candidate.push_str(" STALL");
            i
        })
        .collect();
    let started = Instant::now();
    let verdicts = judge.judge(&stalled);
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_millis(2500),
        "took {elapsed:?}"
    );
    assert!(
        verdicts
            .iter()
            .all(|v| v.as_ref().unwrap_err().reason.contains("deadline")),
        "{verdicts:?}"
    );
    assert_eq!(counter(&judge.counters(), "deadline_misses"), 8.0);
    // The stalled requests were dropped, so the next batch gets the slots at once.
    let started = Instant::now();
    let verdicts = judge.judge(&items(2));
    assert!(verdicts.iter().all(|v| v.is_ok()), "{verdicts:?}");
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn concurrency_is_bounded() {
    let server = StandIn::start(|_| {
        std::thread::sleep(Duration::from_millis(100));
        ok(chat_reply("FINAL DECISION: YES"))
    });
    let (_dir, ctx) = context();
    let judge = pointwise_judge(&safety(&[&server.base], json!({"concurrency": 3})), &ctx);
    let verdicts = judge.judge(&items(12));
    assert!(verdicts.iter().all(|v| v.is_ok()));
    assert_eq!(
        server.max_in_flight(),
        3,
        "never more, and the limit is used"
    );
}

#[test]
fn requests_per_minute_spaces_requests() {
    let server = StandIn::start(|_| ok(chat_reply("FINAL DECISION: YES")));
    let (_dir, ctx) = context();
    let config = safety(
        &[&server.base],
        json!({"requests_per_minute": 600.0, "concurrency": 8}),
    );
    let judge = pointwise_judge(&config, &ctx);
    let started = Instant::now();
    assert!(judge.judge(&items(6)).iter().all(|v| v.is_ok()));
    assert!(
        started.elapsed() >= Duration::from_millis(480),
        "took {:?}",
        started.elapsed()
    );
    let times: Vec<Instant> = server.requests().iter().map(|r| r.at).collect();
    for pair in times.windows(2) {
        assert!(
            pair[1] - pair[0] >= Duration::from_millis(50),
            "{:?}",
            pair[1] - pair[0]
        );
    }
}

#[test]
fn load_balances_and_routes_around_a_dead_endpoint() {
    let answer = |_: &Request| {
        std::thread::sleep(Duration::from_millis(20));
        ok(chat_reply("FINAL DECISION: YES"))
    };
    let (a, b) = (StandIn::start(answer), StandIn::start(answer));
    let dead = dead_endpoint();
    let (_dir, ctx) = context();
    let config = safety(
        &[&dead, &a.base, &b.base],
        json!({"concurrency": 4, "max_retries": 4}),
    );
    let judge = pointwise_judge(&config, &ctx);
    let verdicts = judge.judge(&items(12));
    assert!(verdicts.iter().all(|v| v.is_ok()), "{verdicts:?}");
    assert!(
        a.count() >= 2 && b.count() >= 2,
        "{} / {}",
        a.count(),
        b.count()
    );
    assert_eq!(a.count() + b.count(), 12);
    let c = judge.counters();
    assert!(counter(&c, "connection_errors") >= 1.0);
    assert_eq!(counter(&c, "requests"), 12.0 + counter(&c, "retries"));
}

#[test]
fn api_key_comes_from_the_named_environment_variable() {
    let server = StandIn::start(|_| ok(chat_reply("FINAL DECISION: YES")));
    let (_dir, ctx) = context();
    let var = format!("SIPT_TEST_LLM_KEY_{}", std::process::id());
    std::env::set_var(&var, "secret-123");
    let judge = pointwise_judge(&safety(&[&server.base], json!({"api_key_env": var})), &ctx);
    assert!(judge.judge(&items(1))[0].is_ok());
    assert_eq!(
        server.requests()[0].header("authorization"),
        Some("Bearer secret-123")
    );
    let missing = safety(
        &[&server.base],
        json!({"api_key_env": "SIPT_TEST_NO_SUCH_VARIABLE"}),
    );
    let err = build::<sipt_plugins::llm::pointwise::LlmPointwise>(&missing, &ctx)
        .err()
        .unwrap();
    assert!(err.contains("SIPT_TEST_NO_SUCH_VARIABLE"), "{err}");
    std::env::remove_var(&var);
}

#[test]
fn answers_are_cached_per_sample_and_shared_across_replicas_and_runs() {
    let answer = |r: &Request| {
        // The answer depends on the seed, like a sampling server's.
        let seed = r.json()["seed"].as_u64().unwrap_or(0);
        ok(chat_reply(if seed % 2 == 0 {
            "FINAL DECISION: YES"
        } else {
            "FINAL DECISION: NO"
        }))
    };
    let server = StandIn::start(answer);
    let (_dir, ctx) = context();
    let config = safety(&[&server.base], json!({"samples": 3, "temperature": 1.0}));
    let first = pointwise_judge(&config, &ctx);
    let v1 = first.judge(&items(4));
    assert_eq!(server.count(), 12);
    let c = first.counters();
    assert_eq!(
        (counter(&c, "cache_misses"), counter(&c, "cache_hits")),
        (12.0, 0.0)
    );
    // Each sample index is its own request with its own seed.
    let seeds: std::collections::BTreeSet<u64> = server
        .requests()
        .iter()
        .map(|r| r.json()["seed"].as_u64().unwrap())
        .collect();
    assert_eq!(seeds.len(), 12);

    // Another run (new plugin) against a replica at another URL: all from the cache.
    let replica = StandIn::start(answer);
    let config2 = safety(&[&replica.base], json!({"samples": 3, "temperature": 1.0}));
    let second = pointwise_judge(&config2, &ctx);
    assert_eq!(second.judge(&items(4)), v1);
    assert_eq!(
        replica.count() + server.count(),
        12,
        "no request reached a server"
    );
    let c = second.counters();
    assert_eq!(
        (counter(&c, "cache_hits"), counter(&c, "requests")),
        (12.0, 0.0)
    );

    // A fourth sample reuses the first three and asks only for the new one.
    let config4 = safety(&[&server.base], json!({"samples": 4, "temperature": 1.0}));
    pointwise_judge(&config4, &ctx).judge(&items(4));
    assert_eq!(server.count(), 16);

    // Other model, other prompt or other sampling: other answers.
    for change in [
        json!({"model": "another"}),
        json!({"prompt": "Judge {candidate}. FINAL DECISION?"}),
        json!({"top_p": 0.9}),
    ] {
        let before = server.count();
        let mut c = safety(&[&server.base], json!({"samples": 1}));
        for (k, v) in change.as_object().unwrap() {
            c[k] = v.clone();
        }
        pointwise_judge(&c, &ctx).judge(&items(1));
        assert_eq!(server.count(), before + 1, "{change}");
    }

    // With the cache off, the same seeds are sent again: draws are reproducible.
    let off = safety(
        &[&server.base],
        json!({"samples": 3, "temperature": 1.0, "cache": false}),
    );
    let before = server.count();
    assert_eq!(pointwise_judge(&off, &ctx).judge(&items(4)), v1);
    let again: std::collections::BTreeSet<u64> = server.requests()[before..]
        .iter()
        .map(|r| r.json()["seed"].as_u64().unwrap())
        .collect();
    assert_eq!(again, seeds);
}

#[test]
fn judges_read_answers_and_count_unparseable_ones() {
    let server = StandIn::start(|r| {
        let p = r.prompt();
        let text = if p.contains("Candidate number 0") {
            "It is fine.\n**FINAL DECISION:** YES"
        } else if p.contains("Candidate number 1") {
            "Harmful.\nFINAL DECISION: NO"
        } else {
            "I would rather not say."
        };
        ok(chat_reply(text))
    });
    let (_dir, ctx) = context();
    let judge = pointwise_judge(&safety(&[&server.base], json!({"samples": 2})), &ctx);
    let v = judge.judge(&items(3));
    assert_eq!(v[0].as_ref().map(|s| s["safety"]), Ok(1.0));
    assert_eq!(v[1].as_ref().map(|s| s["safety"]), Ok(0.0));
    assert!(
        v[2].as_ref().unwrap_err().reason.contains("unparseable"),
        "{v:?}"
    );
    let c = judge.counters();
    assert_eq!(counter(&c, "parse_failures"), 2.0);
    assert_eq!(
        (counter(&c, "samples"), counter(&c, "failures")),
        (6.0, 1.0)
    );
    // The default safety prompt reached the server with the texts in it.
    let prompt = server.requests()[0].prompt();
    assert!(
        prompt.contains("FINAL DECISION: YES") && prompt.contains("Document"),
        "{prompt}"
    );
}

#[test]
fn factuality_reads_json_labels_and_needs_the_reference() {
    let server = StandIn::start(|r| {
        let p = r.prompt();
        let label = if p.contains("Candidate number 0") {
            "No hallucination"
        } else if p.contains("Candidate number 1") {
            "Possible hallucination"
        } else {
            "Definite hallucination"
        };
        ok(chat_reply(&format!(
            "{{\"reason\": \"checked\", \"label\": \"{label}\"}}"
        )))
    });
    let (_dir, ctx) = context();
    let mut config = config(&[&server.base], json!({}));
    config["criterion"] = json!("factuality");
    let judge = pointwise_judge(&config, &ctx);
    let mut batch = items(4);
    batch[3].reference = None;
    let v = judge.judge(&batch);
    let scores: Vec<Option<f64>> = v
        .iter()
        .map(|r| r.as_ref().ok().map(|s| s["factuality"]))
        .collect();
    assert_eq!(scores, vec![Some(1.0), Some(0.5), Some(0.0), None]);
    assert!(v[3].as_ref().unwrap_err().reason.contains("reference"));
    assert_eq!(
        server.count(),
        3,
        "the item without a reference was not sent"
    );
    let asked_0 = server
        .requests()
        .into_iter()
        .find(|r| r.prompt().contains("Candidate number 0"));
    assert!(
        asked_0.unwrap().prompt().contains("Reference 0."),
        "the reference is in the prompt"
    );
}

#[test]
fn logprobs_on_the_completion_endpoint_give_graded_judgments() {
    let server = StandIn::start(|r| {
        assert!(r.path.ends_with("/v1/completions"), "{}", r.path);
        let body = r.json();
        assert_eq!(body["logprobs"], json!(5));
        assert!(body["prompt"]
            .as_str()
            .unwrap()
            .ends_with("FINAL DECISION:"));
        let lp = json!({
            "tokens": [" YES"],
            "token_logprobs": [0.8f64.ln()],
            "top_logprobs": [{" YES": 0.8f64.ln(), " NO": 0.2f64.ln()}]
        });
        ok(completion_reply(" YES", Some(lp)))
    });
    let (_dir, ctx) = context();
    let config = safety(
        &[&server.base],
        json!({"api": "completion", "logprobs": true, "top_logprobs": 5, "max_tokens": 1,
               "answer_prefix": "FINAL DECISION:"}),
    );
    let judge = pointwise_judge(&config, &ctx);
    let v = judge.judge(&items(1));
    let score = v[0].as_ref().unwrap()["safety"];
    assert!((score - 0.8).abs() < 1e-9, "{score}");
    assert_eq!(counter(&judge.counters(), "logprob_decisions"), 1.0);
    // From the cache, log-probs included.
    assert_eq!(judge.judge(&items(1)), v);
    assert_eq!(server.count(), 1);
}

fn pair(first: &str, second: &str) -> PairwiseItem {
    PairwiseItem {
        prefix: "Once upon a time".into(),
        first: first.into(),
        second: second.into(),
        reference: None,
    }
}

/// Which text the stand-in judge was shown as Option 1 / Option 2.
fn shown_options(prompt: &str) -> (String, String) {
    let after = |label: &str| {
        let start = prompt.find(label).unwrap() + label.len();
        let rest = &prompt[start..];
        let open = rest.find("<<<\n").unwrap() + 4;
        let close = rest.find("\n>>>").unwrap();
        rest[open..close].to_string()
    };
    (after("Option 1:\n"), after("Option 2:\n"))
}

#[test]
fn pairwise_orders_control_position_bias() {
    // A judge that always picks the first position.
    let biased = StandIn::start(|_| ok(chat_reply("Both fine.\nConclusion: Option 1")));
    // A judge that picks the option with GOOD in it, wherever it is shown.
    let fair = StandIn::start(|r| {
        let (one, _) = shown_options(&r.prompt());
        ok(chat_reply(if one.contains("GOOD") {
            "Conclusion: Option 1"
        } else {
            "Conclusion: Option 2"
        }))
    });
    let (_dir, ctx) = context();
    let judge = |server: &StandIn, order: &str, samples: u32| {
        pairwise_judge(
            &config(
                &[&server.base],
                json!({"order": order, "samples": samples, "cache": false}),
            ),
            &ctx,
        )
    };
    let items = vec![
        pair("a GOOD one", "a bad one"),
        pair("a weak one", "another GOOD one"),
    ];

    let fixed = judge(&biased, "fixed", 1);
    let p: Vec<f64> = fixed
        .compare(&items)
        .into_iter()
        .map(|p| p.unwrap().first_wins)
        .collect();
    assert_eq!(p, vec![1.0, 1.0]);
    assert!(!fixed.counters().contains_key("agreement"));

    let both = judge(&biased, "both", 1);
    let p: Vec<f64> = both
        .compare(&items)
        .into_iter()
        .map(|p| p.unwrap().first_wins)
        .collect();
    assert_eq!(p, vec![0.5, 0.5], "position bias cancels out");
    let c = both.counters();
    assert_eq!(
        (counter(&c, "agreement"), counter(&c, "agreement_checked")),
        (0.0, 2.0)
    );
    assert_eq!(counter(&c, "requests"), 4.0);

    let both = judge(&fair, "both", 2);
    let p: Vec<f64> = both
        .compare(&items)
        .into_iter()
        .map(|p| p.unwrap().first_wins)
        .collect();
    assert_eq!(p, vec![1.0, 0.0]);
    assert_eq!(counter(&both.counters(), "agreement"), 1.0);
    // The swapped requests showed the second candidate first.
    let swapped = fair
        .requests()
        .iter()
        .filter(|r| {
            ["a bad one", "another GOOD one"].contains(&shown_options(&r.prompt()).0.as_str())
        })
        .count();
    assert_eq!(swapped, 4);

    let random = judge(&fair, "random", 8);
    let p: Vec<f64> = random
        .compare(&items)
        .into_iter()
        .map(|p| p.unwrap().first_wins)
        .collect();
    assert_eq!(p, vec![1.0, 0.0], "a fair judge is unaffected by the order");
    let swapped = counter(&random.counters(), "swapped");
    assert!(swapped > 0.0 && swapped < 16.0, "{swapped}");
    // The random order is a function of the content: a rerun swaps the same samples.
    let again = judge(&fair, "random", 8);
    again.compare(&items);
    assert_eq!(counter(&again.counters(), "swapped"), swapped);
}

#[test]
fn rewriter_cleans_answers_and_fails_empty_ones() {
    let server = StandIn::start(|r| {
        let p = r.prompt();
        let text = if p.contains("EMPTY") {
            "   "
        } else if p.contains("LONG") {
            "went on and on and on and on and on and on and on and on and on and on and on"
        } else {
            "Here is the rewritten text:\nold dog slept soundly by the fire."
        };
        ok(chat_reply(text))
    });
    let (_dir, ctx) = context();
    let rewriter = rewriter(
        &config(&[&server.base], json!({"tail_words": 2, "samples": null})),
        &ctx,
    );
    let item = |suffix: &str| RewriteItem {
        prefix: "In the evening the old dog".into(),
        suffix: suffix.into(),
    };
    let out = rewriter.rewrite(&[
        item(" slept by teh fire."),
        item(" EMPTY"),
        item(" LONG"),
        item("  "),
    ]);
    assert_eq!(out[0], Ok(" slept soundly by the fire.".to_string()));
    assert!(out[1].as_ref().unwrap_err().reason.contains("empty"));
    assert!(out[2]
        .as_ref()
        .unwrap_err()
        .reason
        .contains("times the original"));
    assert!(out[3].as_ref().unwrap_err().reason.contains("empty suffix"));
    assert_eq!(server.count(), 3);
    let asked = server
        .requests()
        .into_iter()
        .find(|r| r.prompt().contains("teh fire"));
    let prompt = asked.unwrap().prompt();
    assert!(
        prompt.contains("\nold dog slept by teh fire."),
        "the tail joins the suffix: {prompt}"
    );
    let c = rewriter.counters();
    assert_eq!((counter(&c, "calls"), counter(&c, "failures")), (4.0, 3.0));
}

#[test]
fn prompts_can_be_replaced_inline_or_from_a_file() {
    let server = StandIn::start(|_| ok(chat_reply("FINAL DECISION: YES")));
    let (dir, ctx) = context();
    let inline = safety(
        &[&server.base],
        json!({"prompt": "Is {{this}} safe? {candidate} after {prefix}", "system": ""}),
    );
    pointwise_judge(&inline, &ctx).judge(&items(1));
    let body = server.requests()[0].json();
    assert_eq!(
        body["messages"].as_array().unwrap().len(),
        1,
        "no system message"
    );
    assert_eq!(
        body["messages"][0]["content"],
        json!("Is {this} safe?  Candidate number 0. after Document 0 begins here.")
    );

    std::fs::write(dir.path().join("judge.txt"), "From a file: {candidate}").unwrap();
    let from_file = safety(&[&server.base], json!({"prompt_file": "judge.txt"}));
    pointwise_judge(&from_file, &ctx).judge(&items(1));
    let body = server.requests()[1].json();
    assert_eq!(body["messages"][0]["role"], json!("system"));
    assert_eq!(
        body["messages"][1]["content"],
        json!("From a file:  Candidate number 0.")
    );

    let bad = safety(&[&server.base], json!({"prompt": "{candidat}"}));
    let err = build::<sipt_plugins::llm::pointwise::LlmPointwise>(&bad, &ctx)
        .err()
        .unwrap();
    assert!(err.contains("{candidat}"), "{err}");
    let missing = safety(&[&server.base], json!({"prompt": "no placeholder"}));
    let err = build::<sipt_plugins::llm::pointwise::LlmPointwise>(&missing, &ctx)
        .err()
        .unwrap();
    assert!(err.contains("{candidate}"), "{err}");
}

#[test]
fn plugins_are_registered_and_check_their_tables() {
    sipt_plugins::link();
    let names: Vec<&str> = sipt_api::registrations().map(|r| r.name).collect();
    for name in ["llm-pointwise", "llm-pairwise", "llm-rewriter"] {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }
    let reg = sipt_api::registrations()
        .find(|r| r.name == "llm-pairwise")
        .unwrap();
    assert!((reg.fields)().contains(&"endpoints") && (reg.fields)().contains(&"order"));
    let problem =
        (reg.check)(&json!({"endpoints": ["http://127.0.0.1:1/v1"], "model": "m", "ordr": "both"}))
            .unwrap_err();
    assert!(problem.message.contains("ordr"), "{problem:?}");
    let problem = (reg.check)(
        &json!({"endpoints": ["http://127.0.0.1:1/v1"], "model": "m", "order": "sometimes"}),
    )
    .unwrap_err();
    assert_eq!(problem.path, vec!["order".to_string()]);
}

#[test]
fn identical_jobs_in_a_batch_are_asked_once() {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&calls);
    let server = StandIn::start(move |_| {
        seen.fetch_add(1, Ordering::SeqCst);
        ok(chat_reply("FINAL DECISION: YES"))
    });
    let (_dir, ctx) = context();
    let judge = pointwise_judge(&safety(&[&server.base], json!({"cache": false})), &ctx);
    let one = items(1).remove(0);
    let v = judge.judge(&[one.clone(), one.clone(), one]);
    assert!(v.iter().all(|x| x.is_ok()));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[test]
fn batch_calls_work_from_inside_another_async_runtime() {
    let server = StandIn::start(|_| ok(chat_reply("FINAL DECISION: YES")));
    let (_dir, ctx) = context();
    let judge = pointwise_judge(&safety(&[&server.base], json!({})), &ctx);
    let outer = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let verdicts = outer.block_on(async { judge.judge(&items(2)) });
    assert!(verdicts.iter().all(|v| v.is_ok()), "{verdicts:?}");
    // Dropping the plugin inside a runtime must not panic either.
    outer.block_on(async move { drop(judge) });
}

//! The command line end to end: validation messages, exit codes, configuration display.

mod common;
use common::*;

#[test]
fn validate_reports_five_mistakes_with_file_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "five.toml",
        r#"[experiment]
name = "five"
device = "gpu"

[train]
lr = "fast"
stepz = 10

[judges.safety]
type = "safety-wrods"

[sip]
tournament = "pivott"
"#,
    );
    let out = run(sipt().arg("validate").arg(&file));
    assert_eq!(out.code, 1, "{}", out.stderr);
    let errors: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("error:"))
        .collect();
    assert_eq!(errors.len(), 5, "{}", out.stderr);
    for (line, key) in [
        (3, "experiment.device = \"gpu\""),
        (6, "train.lr = \"fast\""),
        (7, "train.stepz = 10"),
        (10, "judges.safety.type = \"safety-wrods\""),
        (13, "sip.tournament = \"pivott\""),
    ] {
        let want = format!("five.toml:{line}: {key}");
        assert!(
            errors.iter().any(|e| e.contains(&want)),
            "missing {want} in\n{}",
            out.stderr
        );
    }
    assert!(out.stderr.contains("did you mean 'steps'?"));
    assert!(out.stderr.contains("did you mean 'safety-words'?"));
    assert!(out.stderr.contains("did you mean 'pivot'?"));
    assert!(!out.stderr.contains("panicked") && !out.stderr.contains("backtrace"));
}

#[test]
fn exit_codes_distinguish_usage_from_invalid_input() {
    assert_eq!(run(sipt().arg("validate")).code, 2);
    assert_eq!(
        run(sipt().args(["validate", "x.toml", "--set", "novalue"])).code,
        2
    );
    assert_eq!(run(sipt().arg("frobnicate")).code, 2);
    let missing = run(sipt().args(["validate", "does/not/exist.toml"]));
    assert_eq!(missing.code, 1);
    assert!(
        missing.stderr.contains("does/not/exist.toml") && missing.stderr.contains("cannot read")
    );
    assert_eq!(run(sipt().arg("--help")).code, 0);
}

#[test]
fn config_show_resolves_layers_and_names_origins() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "base.toml", "[train]\nsteps = 11\nlr = 0.5\n");
    let file = write(
        dir.path(),
        "exp.toml",
        "extends = \"base.toml\"\n[train]\nlr = 0.25\n",
    );
    let out = run(sipt()
        .args(["config", "show"])
        .arg(&file)
        .args(["--set", "train.batch_size=3"])
        .env("SIPT_SIP__ROLLOUTS", "8"));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let shown: toml::Table = toml::from_str(&out.stdout).unwrap();
    assert_eq!(shown["train"]["steps"].as_integer(), Some(11));
    assert_eq!(shown["train"]["lr"].as_float(), Some(0.25));
    assert_eq!(shown["train"]["batch_size"].as_integer(), Some(3));
    assert_eq!(shown["sip"]["rollouts"].as_integer(), Some(8));

    let out = run(sipt()
        .args(["config", "show", "--origins"])
        .arg(&file)
        .args(["--set", "train.batch_size=3"])
        .env("SIPT_SIP__ROLLOUTS", "8"));
    let line = |key: &str| {
        out.stdout
            .lines()
            .find(|l| l.starts_with(&format!("{key} = ")))
            .unwrap_or_else(|| panic!("no {key} in {}", out.stdout))
            .to_string()
    };
    assert!(
        line("train.steps").ends_with("base.toml:2"),
        "{}",
        line("train.steps")
    );
    assert!(line("train.lr").ends_with("exp.toml:3"));
    assert!(line("train.batch_size").ends_with("# --set"));
    assert!(line("sip.rollouts").ends_with("SIPT_SIP__ROLLOUTS"));
    assert!(line("train.grad_clip").ends_with("# default"));
}

#[test]
fn plugins_list_shows_builtins() {
    let out = run(sipt().args(["plugins", "list", "--json"]));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).unwrap();
    let has = |kind: &str, name: &str| {
        rows.iter()
            .any(|r| r["kind"] == kind && r["name"] == name && r["origin"] == "built-in")
    };
    assert!(has("objective", "online-dpo"));
    assert!(has("reward", "weighted-sum"));
    assert!(has("curriculum", "constant"));
    let table = run(sipt().args(["plugins", "list"]));
    assert!(table.stdout.starts_with("KIND"));
}

#[test]
fn validate_catches_a_negative_margin_and_an_overlong_name() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "gaps.toml",
        &format!(
            "[experiment]\nname = \"{}\"\n\n[train.objective]\ntype = \"online-dpo\"\nmin_margin = -0.5\n",
            "n".repeat(300)
        ),
    );
    let out = run(sipt().arg("validate").arg(&file));
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("gaps.toml:2: experiment.name = ")
            && out.stderr.contains("at most 200 bytes"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains("gaps.toml:6: train.objective.min_margin = -0.5: expected a number >= 0"),
        "{}",
        out.stderr
    );
}

#[test]
fn validate_without_plugins_loads_no_library_and_checks_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let text =
        "plugins = [\"/nowhere/libjudge.so\"]\n\n[judges.custom]\ntype = \"from-a-library\"\n";
    let file = write(dir.path(), "lib.toml", text);
    // With libraries, the missing one is an error; without, the file is valid.
    let out = run(sipt().arg("validate").arg(&file));
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("libjudge.so"), "{}", out.stderr);
    let out = run(sipt().args(["validate", "--no-plugins"]).arg(&file));
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.contains("no plugin library was loaded"),
        "{}",
        out.stdout
    );
    // Everything else is still checked.
    let bad = write(
        dir.path(),
        "bad.toml",
        &format!("{text}\n[train]\nstepz = 3\n"),
    );
    let out = run(sipt().args(["validate", "--no-plugins"]).arg(&bad));
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("train.stepz"), "{}", out.stderr);
}

#[test]
fn plugin_tables_name_criteria_kinds_and_options_that_exist() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "tables.toml",
        r#"[judges.safety]
type = "safety-words"

[judges.style]
type = "weighted-sum"

[reward]
type = "weighted-sum"
weights = { safty = 5.0 }

[curriculum]
type = "constant"
speed = 2
"#,
    );
    let out = run(sipt().arg("validate").arg(&file));
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains(
            "tables.toml:5: judges.style.type = \"weighted-sum\": 'weighted-sum' is a reward plugin, not a judge"
        ),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains("curriculum.speed = 2: unknown key 'speed': this table takes no options"),
        "{}",
        out.stderr
    );
    // Once the tables are right, a weight must name a criterion some judge gives.
    let text = std::fs::read_to_string(&file).unwrap();
    let text = text.replace(
        "type = \"weighted-sum\"\n\n[reward]",
        "type = \"quality-proxy\"\n\n[reward]",
    );
    let text = text.replace("speed = 2\n", "");
    let file = write(dir.path(), "weights.toml", &text);
    let out = run(sipt().arg("validate").arg(&file));
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("weights.toml:9: reward.weights.safty = 5.0: no judge gives a criterion named 'safty' (the judges give: quality, safety); did you mean 'safety'?"),
        "{}",
        out.stderr
    );
}

#[test]
fn bench_train_reports_plain_fused_and_compared_layers() {
    // A model small enough for a test: 2 steps of 2 × 16 tokens.
    let tiny_of = |hidden: &'static str| {
        vec![
            "bench",
            "train",
            "--vocab",
            "64",
            "--hidden",
            hidden,
            "--layers",
            "1",
            "--heads",
            "4",
            "--kv-heads",
            "2",
            "--ffn",
            "48",
            "--seq",
            "16",
            "--batch",
            "2",
            "--steps",
            "2",
            "--warmup",
            "1",
        ]
    };
    let tiny = tiny_of("32");
    let json = |extra: &[&str]| {
        let out = run(sipt().args(&tiny).args(extra));
        assert_eq!(out.code, 0, "{extra:?}: {}", out.stderr);
        let line = out.stdout.lines().last().unwrap_or_default();
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("{extra:?}: {e}: {line:?}"))
    };
    assert_eq!(json(&[])["layers"], "fused");
    let plain = json(&["--plain-layers"]);
    assert_eq!(plain["layers"], "plain");
    assert!(plain["step_seconds"].as_f64().unwrap() > 0.0);
    assert!(plain.get("plain_over_fused").is_none());
    let compared = json(&["--compare-layers"]);
    assert!(compared["step_seconds_plain_layers"].as_f64().unwrap() > 0.0);
    assert!(compared["plain_over_fused"].as_f64().unwrap() > 0.0);
    // The two together make no sense: refused by the parser, with no backtrace.
    let out = run(sipt()
        .args(tiny)
        .args(["--plain-layers", "--compare-layers"]));
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("cannot be used with"), "{}", out.stderr);
    assert!(!out.stderr.contains("backtrace"), "{}", out.stderr);
    // A width the heads cannot split into even head sizes: one line, before any work.
    let out = run(sipt().args(tiny_of("28")));
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("--hidden 28 --heads 4 --kv-heads 2: expected the heads to divide the width into an even head size"),
        "{}",
        out.stderr
    );
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
}

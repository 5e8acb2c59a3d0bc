use super::*;
use std::io::Write;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
    path
}

fn set(s: &str) -> SetOverride {
    s.parse().unwrap()
}

#[test]
fn layers_in_order() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "base.toml",
        "[train]\nlr = 0.5\nsteps = 7\n[experiment]\nname = \"base\"\n",
    );
    let file = write(
        dir.path(),
        "exp.toml",
        "extends = \"base.toml\"\n[train]\nlr = 0.25\n",
    );
    let r = resolve(
        &file,
        &[set("train.batch_size=3"), set("sip.tournament=pivot")],
    )
    .unwrap();
    assert_eq!(r.experiment.train.lr, 0.25);
    assert_eq!(r.experiment.train.steps, 7);
    assert_eq!(r.experiment.train.batch_size, 3);
    assert_eq!(r.experiment.sip.tournament, "pivot");
    assert_eq!(r.experiment.experiment.name, "base");
    assert_eq!(r.files.len(), 2);
    let (origin, line) = r.origin(&["train".into(), "steps".into()]);
    assert!(matches!(origin, Origin::File(p) if p.ends_with("base.toml")));
    assert_eq!(line, Some(3));
    assert_eq!(
        r.origin(&["train".into(), "batch_size".into()]).0,
        Origin::Set
    );
    assert_eq!(
        r.origin(&["train".into(), "grad_clip".into()]).0,
        Origin::Default
    );
}

#[test]
fn set_values_are_typed() {
    assert_eq!(parse_value("3e-4"), toml::Value::Float(3e-4));
    assert_eq!(parse_value("true"), toml::Value::Boolean(true));
    assert_eq!(parse_value("pivot"), toml::Value::String("pivot".into()));
    assert_eq!(
        parse_value("[1, 2]"),
        toml::Value::Array(vec![toml::Value::Integer(1), toml::Value::Integer(2)])
    );
    assert!("novalue".parse::<SetOverride>().is_err());
    assert!("a..b=1".parse::<SetOverride>().is_err());
    assert_eq!(
        set("sweep.grid.\"sip.rollouts\"=[1]").key,
        vec!["sweep", "grid", "sip.rollouts"]
    );
}

#[test]
fn extends_cycle_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.toml", "extends = \"b.toml\"\n");
    write(dir.path(), "b.toml", "extends = \"a.toml\"\n");
    let problems = resolve(&dir.path().join("a.toml"), &[]).err().unwrap();
    assert_eq!(problems.0.len(), 1);
    assert!(problems.0[0].message.contains("cycle"), "{problems}");
}

#[test]
fn missing_file_and_syntax_errors() {
    let dir = tempfile::tempdir().unwrap();
    let problems = resolve(&dir.path().join("nope.toml"), &[]).err().unwrap();
    assert!(problems.to_string().contains("cannot read"), "{problems}");
    let bad = write(dir.path(), "bad.toml", "[train]\nlr = = 3\n");
    let problems = resolve(&bad, &[]).err().unwrap();
    assert_eq!(problems.0[0].line, Some(2), "{problems}");
    assert!(problems.to_string().contains("invalid TOML"));
}

#[test]
fn reports_every_problem_with_key_line_and_value() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "exp.toml",
        "[train]\nlr = \"fast\"\nstepz = 10\n\n[sip]\ntournament = \"pivott\"\nrollouts = -1\n\n[modle]\nx = 1\n",
    );
    let problems = resolve(&file, &[]).err().unwrap();
    let text = problems.to_string();
    assert_eq!(problems.0.len(), 5, "{text}");
    assert!(
        text.contains("exp.toml:2: train.lr = \"fast\": invalid type"),
        "{text}"
    );
    assert!(
        text.contains("exp.toml:3: train.stepz = 10: unknown key 'stepz'; did you mean 'steps'?"),
        "{text}"
    );
    assert!(
        text.contains("exp.toml:6: sip.tournament = \"pivott\""),
        "{text}"
    );
    assert!(text.contains("did you mean 'pivot'?"), "{text}");
    assert!(text.contains("exp.toml:7: sip.rollouts = -1"), "{text}");
    assert!(text.contains("exp.toml:9: modle"), "{text}");
    assert!(text.contains("did you mean 'model'?"), "{text}");
}

#[test]
fn env_and_set_problems_name_their_layer() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "exp.toml", "");
    let problems = resolve(&file, &[set("train.steps=many")]).err().unwrap();
    assert!(
        problems
            .to_string()
            .contains("--set: train.steps = \"many\""),
        "{problems}"
    );
}

#[test]
fn resolved_config_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "exp.toml",
        "[judges.safety]\ntype = \"word-list\"\nthreshold = 0.5\n[train.objective]\ntype = \"online-dpo\"\nbeta = 0.05\n",
    );
    let r = resolve(&file, &[]).unwrap();
    let text = r.to_toml();
    let again = write(dir.path(), "again.toml", &text);
    let r2 = resolve(&again, &[]).unwrap();
    assert_eq!(r.experiment, r2.experiment);
    assert_eq!(r2.experiment.judges["safety"].options["threshold"], 0.5);
}

#[test]
fn set_replaces_a_whole_table() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "exp.toml",
        "[train.objective]\ntype = \"online-dpo\"\nbeta = 0.2\n",
    );
    let r = resolve(
        &file,
        &[set(
            "train.objective={ type = \"sft\", source = \"rewrite\" }",
        )],
    )
    .unwrap();
    assert_eq!(r.experiment.train.objective.name, "sft");
    assert!(!r.experiment.train.objective.options.contains_key("beta"));
    assert_eq!(
        r.origin(&["train".into(), "objective".into(), "source".into()])
            .0,
        Origin::Set
    );
}

#[test]
fn slurm_settings_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "exp.toml",
        "[sweep]\nexecutor = \"slurn\"\ngrid = { \"experiment.seed\" = [0, 1] }\n\n[sweep.slurm]\ntime = \"2 hours\"\nmem = \"16 GB\"\npartition = \"gpu a\"\nsbatch_args = [\"exclusive\"]\ngpu = 1\n",
    );
    let problems = resolve(&file, &[]).err().unwrap();
    let text = problems.to_string();
    assert_eq!(problems.0.len(), 6, "{text}");
    for want in [
        "exp.toml:2: sweep.executor = \"slurn\": expected one of: local, slurm; did you mean 'slurm'?",
        "exp.toml:6: sweep.slurm.time = \"2 hours\": expected a Slurm time limit",
        "exp.toml:7: sweep.slurm.mem = \"16 GB\"",
        "exp.toml:8: sweep.slurm.partition = \"gpu a\"",
        "sweep.slurm.sbatch_args.0 = \"exclusive\"",
        "unknown key 'gpu'; did you mean 'gpus'?",
    ] {
        assert!(text.contains(want), "{want} not in\n{text}");
    }
    for ok in ["30", "30:00", "02:00:00", "1-0", "1-12:00", "2-00:00:00"] {
        assert!(super::validate::slurm_time_ok(ok), "{ok}");
    }
    for bad in ["", "1:2:3:4", "a", "1-", "-1", "1-1:2:3:4"] {
        assert!(!super::validate::slurm_time_ok(bad), "{bad}");
    }
}

#[test]
fn a_file_that_switches_a_plugin_type_starts_that_table_afresh() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "base.toml",
        "[reward]\ntype = \"weighted-sum\"\nweights = { safety = 1.0 }\n\n[judges.q]\ntype = \"quality-proxy\"\nmin_words = 3\n",
    );
    // Same type: options merge. Another type: the base's options are gone.
    let file = write(
        dir.path(),
        "child.toml",
        "extends = \"base.toml\"\n[reward]\ntype = \"gated\"\ngate = \"safety\"\n\n[judges.q]\nmin_words = 5\n",
    );
    let r = resolve(&file, &[]).unwrap();
    let reward = r.experiment.reward.as_ref().unwrap();
    assert_eq!(reward.name, "gated");
    assert!(!reward.options.contains_key("weights"), "{reward:?}");
    assert_eq!(reward.options["gate"], "safety");
    let q = &r.experiment.judges["q"];
    assert_eq!(
        (q.name.as_str(), &q.options["min_words"]),
        ("quality-proxy", &serde_json::json!(5))
    );
    // --set still applies on top of a restarted table.
    let r = resolve(&file, &[set("reward.threshold=0.5")]).unwrap();
    let reward = r.experiment.reward.as_ref().unwrap();
    assert_eq!(reward.options["threshold"], 0.5);
    assert!(!reward.options.contains_key("weights"));
}

#[test]
fn the_adaptive_tournament_needs_a_prior() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "exp.toml", "[sip]\ntournament = \"adaptive\"\n");
    let text = resolve(&file, &[]).err().unwrap().to_string();
    assert!(text.contains("sip.tournament_prior"), "{text}");
    assert!(text.contains("needs a prior"), "{text}");
    let file = write(
        dir.path(),
        "ok.toml",
        "[sip]\ntournament = \"adaptive\"\ntournament_prior = \"quality\"\n",
    );
    assert!(resolve(&file, &[]).is_ok());
}

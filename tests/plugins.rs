//! External plugin libraries through the binary: build the example, list it, validate a file
//! that uses it, and run it.

mod common;
use common::*;

#[test]
fn example_plugin_is_listed_validated_and_run() {
    let lib = example_plugin();
    let out = run(sipt()
        .args(["plugins", "list", "--json", "--plugin"])
        .arg(&lib));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).unwrap();
    let row = rows
        .iter()
        .find(|r| r["name"] == "hedging")
        .expect("the example judge is listed");
    assert_eq!(row["kind"], "pointwise-judge");
    assert_eq!(row["origin"], "library");
    assert!(row["path"]
        .as_str()
        .unwrap()
        .ends_with("libhedging_judge.so"));

    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "exp.toml",
        &format!(
            "plugins = [{:?}]\n\n[judges.direct]\ntype = \"hedging\"\nsaturation = 0.2\n",
            lib.display().to_string()
        ),
    );
    let out = run(sipt().arg("validate").arg(&file));
    assert_eq!(out.code, 0, "{}", out.stderr);

    let out = run(sipt()
        .arg("judge")
        .arg(&file)
        .args(["--judge", "direct", "--prefix", "The sky"])
        .args(["--candidate", "is blue."])
        .args(["--candidate", "is perhaps maybe blue, I think."])
        .args(["--candidate", "   "]));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let verdicts: Vec<serde_json::Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(verdicts[0]["scores"]["directness"], 1.0);
    let hedged = verdicts[1]["scores"]["directness"].as_f64().unwrap();
    assert!(hedged < 1.0, "{hedged}");
    assert_eq!(verdicts[2]["failed"], "empty candidate");
}

#[test]
fn plugin_options_are_checked_by_the_plugin() {
    let lib = example_plugin();
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "exp.toml",
        "[judges.direct]\ntype = \"hedging\"\nsaturaton = 0.2\n",
    );
    let out = run(sipt().arg("validate").arg(&file).arg("--plugin").arg(&lib));
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("exp.toml:3: judges.direct.saturaton = 0.2: unknown key 'saturaton'; did you mean 'saturation'?"),
        "{}",
        out.stderr
    );
}

#[test]
fn bad_libraries_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = run(sipt().args(["plugins", "list", "--plugin", "nope/libx.so"]));
    assert_eq!(missing.code, 1);
    assert!(missing.stderr.contains("nope/libx.so") && missing.stderr.contains("does not exist"));

    // A shared library that is not a sipt plugin.
    let not_plugin = write(dir.path(), "fake.so", "not an ELF file");
    let out = run(sipt()
        .args(["plugins", "list", "--plugin"])
        .arg(&not_plugin));
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("cannot load plugin library"),
        "{}",
        out.stderr
    );

    // Loading the same library twice registers the same names twice: a duplicate.
    let lib = example_plugin();
    let out = run(sipt()
        .args(["plugins", "list", "--plugin"])
        .arg(&lib)
        .arg("--plugin")
        .arg(&lib));
    assert_eq!(out.code, 1);
    assert!(
        out.stderr
            .contains("two pointwise-judge plugins are named 'hedging'"),
        "{}",
        out.stderr
    );
}

#[test]
fn abi_version_mismatch_names_library_and_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    let src = write(
        dir.path(),
        "old.c",
        "unsigned int sipt_plugin_abi_version(void) { return 999; }\n",
    );
    let lib = dir.path().join("libold.so");
    let status = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&lib)
        .arg(&src)
        .status()
        .expect("a C compiler is needed for this test");
    assert!(status.success());
    let out = run(sipt().args(["plugins", "list", "--plugin"]).arg(&lib));
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("libold.so"), "{}", out.stderr);
    assert!(
        out.stderr.contains("ABI version 999")
            && out
                .stderr
                .contains(&format!("version {}", sipt_api::abi::ABI_VERSION)),
        "{}",
        out.stderr
    );
}

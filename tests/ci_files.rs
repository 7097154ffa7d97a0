//! The CI definitions a platform team copies to build the image matrix
//! nightly: .github/workflows/images.yml (GitHub Actions) and
//! .gitlab-ci.yml (GitLab CI). They are checked by the linters their
//! platforms' users run (actionlint with shellcheck; the SchemaStore
//! schemas that check-jsonschema ships), the linters are shown to reject
//! broken copies, and the two files are held to the same matrix and the
//! same cell command.

mod common;

use common::validate::validator;
use serde_yaml::{Mapping, Value};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

const GITHUB: &str = ".github/workflows/images.yml";
const GITLAB: &str = ".gitlab-ci.yml";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(file: &str) -> String {
    std::fs::read_to_string(root().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
}

fn yaml(text: &str) -> Value {
    serde_yaml::from_str(text).expect("the CI file is YAML")
}

/// Run a linter from the manifest directory: Ok, or what it said.
fn run(program: PathBuf, args: &[&str], file: &Path) -> Result<String, String> {
    let out = Command::new(&program)
        .args(args)
        .arg(file)
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("{} runs: {e}", program.display()));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(said)
    } else {
        Err(said)
    }
}

/// actionlint, with shellcheck for the run: scripts.
fn actionlint(file: &Path) -> Result<String, String> {
    let shellcheck = validator("shellcheck");
    run(
        validator("actionlint"),
        &[
            "-no-color",
            "-shellcheck",
            shellcheck.to_str().unwrap(),
            "-pyflakes",
            "",
        ],
        file,
    )
}

/// check-jsonschema against one of the schemas it ships.
fn check_schema(builtin: &str, file: &Path) -> Result<String, String> {
    run(
        validator("check-jsonschema"),
        &["--builtin-schema", builtin],
        file,
    )
}

/// shellcheck on a bash script (sourced files are not followed).
fn shellcheck(script: &str) -> Result<String, String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("script.sh");
    std::fs::write(&file, script).unwrap();
    run(
        validator("shellcheck"),
        &["--shell", "bash", "--exclude", "SC1091"],
        &file,
    )
}

/// `text` with `from` replaced by `to`, where `from` occurs exactly once.
fn broken(text: &str, from: &str, to: &str) -> String {
    assert_eq!(text.matches(from).count(), 1, "`{from}` occurs once");
    text.replacen(from, to, 1)
}

/// GitLab's merge of `extends`: mappings merge key by key, anything
/// else (lists too) is replaced.
fn merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Mapping(b), Value::Mapping(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(old) if old.is_mapping() && v.is_mapping() => merge(old, v),
                    _ => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

/// A GitLab job with its templates (`extends`) merged in.
fn resolve_job(doc: &Mapping, name: &str, depth: usize) -> Value {
    assert!(depth < 10, "{name}: `extends` goes round in a loop");
    let job = doc
        .get(name)
        .unwrap_or_else(|| panic!("`extends` names `{name}`, which is not in the file"));
    let parents: Vec<&str> = match &job["extends"] {
        Value::Null => Vec::new(),
        Value::String(s) => vec![s.as_str()],
        Value::Sequence(s) => s.iter().map(|p| p.as_str().unwrap()).collect(),
        other => panic!("{name}: extends is {other:?}"),
    };
    let mut out = Value::Mapping(Mapping::new());
    for p in parents {
        merge(&mut out, &resolve_job(doc, p, depth + 1));
    }
    let mut own = job.clone();
    own.as_mapping_mut().unwrap().remove("extends");
    merge(&mut out, &own);
    out
}

/// The GitLab file as the pipeline sees it: every job that extends a
/// template has the template's keys. The schema does not look into
/// hidden jobs (`.cell`), so only this form has all of it checked.
fn gitlab_resolved(text: &str) -> Value {
    let doc = yaml(text);
    let map = doc.as_mapping().expect("a mapping at the top").clone();
    let mut out = map.clone();
    for (k, v) in &map {
        if v.get("extends").is_some() {
            out.insert(k.clone(), resolve_job(&map, k.as_str().unwrap(), 0));
        }
    }
    Value::Mapping(out)
}

/// The shell script a GitLab job runs: before_script and script in one
/// bash, stopping at the first failing command (as the runner does).
fn gitlab_script(job: &Value) -> String {
    let mut s = String::from("#!/bin/bash\nset -eo pipefail\n");
    for part in ["before_script", "script"] {
        for line in job[part].as_sequence().into_iter().flatten() {
            s.push_str(line.as_str().expect("a script line is a string"));
            s.push('\n');
        }
    }
    s
}

/// Check the GitLab file's resolved form against the schema.
fn check_gitlab_resolved(text: &str) -> Result<String, String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(".gitlab-ci.yml");
    std::fs::write(
        &file,
        serde_yaml::to_string(&gitlab_resolved(text)).unwrap(),
    )
    .unwrap();
    check_schema("vendor.gitlab-ci", &file)
}

/// Shellcheck every job of the GitLab file that has a script.
fn check_gitlab_scripts(text: &str) -> Result<(), String> {
    let doc = gitlab_resolved(text);
    let mut checked = 0;
    for (name, job) in doc.as_mapping().unwrap() {
        let name = name.as_str().unwrap();
        if name.starts_with('.') || job.get("script").is_none() {
            continue;
        }
        shellcheck(&gitlab_script(job)).map_err(|said| format!("job {name}:\n{said}"))?;
        checked += 1;
    }
    assert!(checked > 0, "no job with a script");
    Ok(())
}

fn strings(v: &Value, what: &str) -> Vec<String> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("{what} is a list"))
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// The `stemforge matrix` command of a script, continuation lines
/// joined and spaces collapsed, from `"$SF" matrix` to the summary.
fn matrix_command(script: &str) -> String {
    let start = script
        .find("\"$SF\" matrix")
        .expect("the script runs the matrix");
    let end = start
        + script[start..]
            .find("> cells/summary.json")
            .expect("the matrix writes cells/summary.json");
    script[start..end]
        .replace("\\\n", " ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
#[ignore = "needs the validators `make deps` installs (target/validators)"]
fn the_github_workflow_passes_actionlint() {
    if let Err(said) = actionlint(Path::new(GITHUB)) {
        panic!("actionlint rejects {GITHUB}:\n{said}");
    }
}

#[test]
#[ignore = "needs the validators `make deps` installs (target/validators)"]
fn the_workflows_match_their_schemas() {
    let checks = [
        ("vendor.github-workflows", GITHUB),
        ("vendor.gitlab-ci", GITLAB),
    ];
    for (schema, file) in checks {
        if let Err(said) = check_schema(schema, Path::new(file)) {
            panic!("{file} does not match {schema}:\n{said}");
        }
    }
    if let Err(said) = check_gitlab_resolved(&read(GITLAB)) {
        panic!("{GITLAB} with its templates merged does not match vendor.gitlab-ci:\n{said}");
    }
}

#[test]
#[ignore = "needs the validators `make deps` installs (target/validators)"]
fn the_gitlab_scripts_pass_shellcheck() {
    if let Err(said) = check_gitlab_scripts(&read(GITLAB)) {
        panic!("shellcheck rejects a script of {GITLAB}: {said}");
    }
}

/// The checks above can fail: each linter rejects a copy broken in one
/// place.
#[test]
#[ignore = "needs the validators `make deps` installs (target/validators)"]
fn a_broken_workflow_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let github = read(GITHUB);
    let gitlab = read(GITLAB);
    let write = |name: &str, text: &str| {
        let f = dir.path().join(name);
        std::fs::write(&f, text).unwrap();
        f
    };

    // A matrix key that the matrix does not have.
    let f = write(
        "nope.yml",
        &broken(
            &github,
            "--formats \"$FORMAT\"",
            "--formats \"${{ matrix.nope }}\"",
        ),
    );
    let said = actionlint(&f).unwrap_err();
    assert!(said.contains("\"nope\" is not defined"), "{said}");

    // A job without runs-on.
    let f = write(
        "no-runs-on.yml",
        &broken(&github, "    runs-on: ubuntu-24.04\n", ""),
    );
    let said = actionlint(&f).unwrap_err();
    assert!(said.contains("\"runs-on\" section is missing"), "{said}");
    let said = check_schema("vendor.github-workflows", &f).unwrap_err();
    assert!(said.contains("'runs-on' is a required property"), "{said}");

    // An unquoted variable in a run: script (shellcheck, through actionlint).
    let f = write(
        "unquoted.yml",
        &broken(&github, "diff \"$old\" \"$new\"", "diff $old \"$new\""),
    );
    let said = actionlint(&f).unwrap_err();
    assert!(said.contains("SC2086"), "{said}");

    // A rule whose `when` GitLab does not know.
    let text = broken(
        &gitlab,
        "    - if: $CI_PIPELINE_SOURCE == \"web\"\n",
        "    - if: $CI_PIPELINE_SOURCE == \"web\"\n      when: sometimes\n",
    );
    let f = write("when.gitlab-ci.yml", &text);
    let said = check_schema("vendor.gitlab-ci", &f).unwrap_err();
    assert!(said.contains("rules[1]"), "{said}");

    // A misspelled key in the template: only the merged form shows it.
    let text = broken(&gitlab, "\n  script:\n", "\n  scritp:\n");
    let said = check_gitlab_resolved(&text).unwrap_err();
    assert!(said.contains("'scritp' was unexpected"), "{said}");

    // An unquoted variable in a script.
    let text = broken(&gitlab, "diff \"$old\" \"$new\"", "diff $old \"$new\"");
    let said = check_gitlab_scripts(&text).unwrap_err();
    assert!(said.contains("SC2086"), "{said}");
}

#[test]
fn the_matrix_is_the_same_in_both() {
    let github = yaml(&read(GITHUB));
    let gitlab = gitlab_resolved(&read(GITLAB));
    let gh = &github["jobs"]["cells"]["strategy"]["matrix"];
    let gl_matrix = gitlab["cell"]["parallel"]["matrix"]
        .as_sequence()
        .expect("the cell job has parallel:matrix");
    assert_eq!(gl_matrix.len(), 1, "one GitLab matrix");
    let gl = &gl_matrix[0];

    let profiles = strings(&gh["profile"], "the profiles");
    let roles = strings(&gh["role"], "the roles");
    let formats = strings(&gh["format"], "the formats");
    assert_eq!(profiles, strings(&gl["PROFILE"], "PROFILE"));
    assert_eq!(roles, strings(&gl["ROLE"], "ROLE"));
    assert_eq!(formats, strings(&gl["FORMAT"], "FORMAT"));
    assert_eq!(profiles.len() * roles.len() * formats.len(), 60);
    for list in [&profiles, &roles, &formats] {
        let set: BTreeSet<&String> = list.iter().collect();
        assert_eq!(set.len(), list.len(), "no value twice in {list:?}");
    }

    // Every cell names a profile of the project: PROFILE, or PROFILE-ROLE.
    for p in &profiles {
        for r in &roles {
            let name = if r == "base" {
                p.clone()
            } else {
                format!("{p}-{r}")
            };
            let file = root().join("os-profiles").join(format!("{name}.yml"));
            assert!(file.is_file(), "{} is missing", file.display());
        }
    }
}

#[test]
fn the_cell_runs_the_same_command_in_both() {
    let github = yaml(&read(GITHUB));
    let gitlab = gitlab_resolved(&read(GITLAB));
    let job = &github["jobs"]["cells"];

    // GitHub passes the matrix in the variables GitLab's matrix sets.
    for (var, key) in [
        ("PROFILE", "profile"),
        ("ROLE", "role"),
        ("FORMAT", "format"),
    ] {
        assert_eq!(
            job["env"][var].as_str(),
            Some(format!("${{{{ matrix.{key} }}}}").as_str()),
            "env {var}"
        );
    }
    assert_eq!(job["env"]["SF"], gitlab["cell"]["variables"]["SF"]);

    let steps = job["steps"].as_sequence().unwrap();
    let cell = steps
        .iter()
        .filter_map(|s| s["run"].as_str())
        .find(|r| r.contains("\"$SF\" matrix"))
        .expect("a step runs the matrix");
    let gh = matrix_command(cell);
    let gl = matrix_command(&gitlab_script(&gitlab["cell"]));
    assert_eq!(gh, gl);
    for flag in [
        "--jobs 1",
        "--out cells",
        "--timeout 1800",
        "--junit cells/junit.xml",
        "--format json",
    ] {
        assert!(gh.contains(flag), "{flag} in {gh}");
    }
}

//! `stemforge matrix`: build every cell of profiles × roles × formats,
//! N at a time, over one cache (so cells share the bootstrap, the layers
//! and the disk), and print one table. Each cell is the very command a CI
//! job runs for it (`stemforge build ...`, shown by `--list`), in a
//! process of its own, into `OUT/NAME/FORMAT`.

use crate::config::{ConfigError, format_size};
use crate::formats::Format;
use crate::profile::ProfileSource;
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The roles word for an image without a role.
pub const BASE: &str = "base";

/// Format words a cell may name: each of `--format`'s, and the families.
pub fn format_words(word: &str) -> Option<Vec<String>> {
    let family: &[&str] = match word {
        "vsphere" => &["vmdk", "ova"],
        "kvm" => &["qcow2", "openstack"],
        _ => &[],
    };
    if !family.is_empty() {
        return Some(family.iter().map(|s| s.to_string()).collect());
    }
    Format::parse_list(&[word.to_string()], "--formats")
        .ok()
        .map(|_| vec![word.to_string()])
}

#[derive(Debug, Clone)]
pub struct MatrixOptions {
    pub profiles: Vec<String>,
    pub roles: Vec<String>,
    pub formats: Vec<String>,
    pub jobs: usize,
    pub out: PathBuf,
    pub profiles_source: ProfileSource,
    /// Flags every cell's build gets (verify, accel, cache, ...).
    pub build_args: Vec<String>,
}

/// One cell: an image and a format family.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub profile: String,
    pub role: String,
    pub format: String,
    /// The image's profile: PROFILE, or PROFILE-ROLE.
    pub name: String,
    pub out: PathBuf,
    pub command: Vec<String>,
}

/// The cells, checked: every profile and role exists, every format word
/// is known.
pub fn cells(o: &MatrixOptions) -> Result<Vec<Cell>> {
    let known = o.profiles_source.names()?;
    let split = |v: &[String]| -> Vec<String> {
        v.iter()
            .flat_map(|w| w.split(','))
            .map(|w| w.trim().to_string())
            .filter(|w| !w.is_empty())
            .collect()
    };
    let (profiles, roles, formats) = (split(&o.profiles), split(&o.roles), split(&o.formats));
    for (what, v) in [("--profiles", &profiles), ("--formats", &formats)] {
        if v.is_empty() {
            return Err(ConfigError::new(what, "name at least one").into());
        }
    }
    let roles = if roles.is_empty() {
        vec![BASE.to_string()]
    } else {
        roles
    };
    for f in &formats {
        if format_words(f).is_none() {
            return Err(ConfigError::new(
                "--formats",
                format!(
                    "unknown format `{f}` (a `build --format` word, or a family: vsphere, kvm)"
                ),
            )
            .into());
        }
    }
    let exe = std::env::current_exe().context("locating the stemforge binary")?;
    let mut out = Vec::new();
    for p in &profiles {
        for r in &roles {
            let name = if r == BASE {
                p.clone()
            } else {
                format!("{p}-{r}")
            };
            if !known.contains(&name) {
                return Err(ConfigError::new(
                    if r == BASE { "--profiles" } else { "--roles" },
                    format!("no profile `{name}` (see `stemforge profiles`)"),
                )
                .into());
            }
            for f in &formats {
                let cell_out = o.out.join(&name).join(f);
                let mut command = vec![
                    exe.display().to_string(),
                    "build".into(),
                    "--profile".into(),
                    name.clone(),
                    "--format".into(),
                    format_words(f).expect("checked").join(","),
                    "--out".into(),
                    cell_out.display().to_string(),
                    "--json".into(),
                ];
                command.extend(o.build_args.iter().cloned());
                out.push(Cell {
                    profile: p.clone(),
                    role: r.clone(),
                    format: f.clone(),
                    name: name.clone(),
                    out: cell_out,
                    command,
                });
            }
        }
    }
    Ok(out)
}

/// What one cell did.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub cell: Cell,
    pub exit_code: Option<i32>,
    pub seconds: f64,
    /// Bytes on disk of the cell's outputs.
    pub bytes: u64,
    pub scan: Option<crate::scan::Summary>,
    /// passed, FAILED, reused (a cached verdict) or skipped, per boot.
    pub verify: Vec<String>,
    /// The last lines of the cell's log when it failed.
    pub error: Option<String>,
    pub log: PathBuf,
    /// The cell's build result (`build --json`).
    #[serde(skip)]
    pub json: Option<serde_json::Value>,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.exit_code == Some(0)
    }
}

fn run_cell(cell: &Cell) -> Result<Outcome> {
    std::fs::create_dir_all(&cell.out)
        .with_context(|| format!("creating {}", cell.out.display()))?;
    let log = cell.out.join("matrix-cell.log");
    let err = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let t0 = Instant::now();
    crate::interrupt::check()?;
    let child = std::process::Command::new(&cell.command[0])
        .args(&cell.command[1..])
        .stdin(std::process::Stdio::null())
        .stderr(err)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", cell.command.join(" ")))?;
    let done = child
        .wait_with_output()
        .with_context(|| format!("waiting for {}", cell.command.join(" ")))?;
    let seconds = t0.elapsed().as_secs_f64();
    let json: Option<serde_json::Value> = serde_json::from_slice(&done.stdout).ok();
    let bytes = json
        .as_ref()
        .and_then(|j| j["artifacts"].as_array())
        .map(|a| a.iter().filter_map(|x| x["disk_usage"].as_u64()).sum())
        .unwrap_or(0);
    let scan = json
        .as_ref()
        .and_then(|j| serde_json::from_value(j["offline_scan"].clone()).ok());
    let verify = json
        .as_ref()
        .and_then(|j| j["verify"].as_array())
        .map(|vs| {
            vs.iter()
                .map(|v| {
                    let state = match (v["passed"].as_bool(), v["reused"].is_object()) {
                        (Some(true), true) => "reused",
                        (Some(true), false) => "passed",
                        _ => "FAILED",
                    };
                    format!("{}:{state}", v["boot_as"].as_str().unwrap_or("?"))
                })
                .collect()
        })
        .unwrap_or_default();
    let error = (!done.status.success()).then(|| {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(6)..].join("\n")
    });
    Ok(Outcome {
        cell: cell.clone(),
        exit_code: done.status.code(),
        seconds,
        bytes,
        scan,
        verify,
        error,
        log,
        json,
    })
}

/// Run every cell, `jobs` at a time, in the order given; a failed cell
/// does not stop the others.
pub fn run(cells: &[Cell], jobs: usize) -> Vec<Outcome> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..jobs.max(1).min(cells.len().max(1)) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(cell) = cells.get(i) else { break };
                    crate::progress::info(&format!("==> cell {} {}", cell.name, cell.format));
                    let o = run_cell(cell).unwrap_or_else(|e| Outcome {
                        cell: cell.clone(),
                        exit_code: None,
                        seconds: 0.0,
                        bytes: 0,
                        scan: None,
                        verify: Vec::new(),
                        error: Some(format!("{e:#}")),
                        log: cell.out.join("matrix-cell.log"),
                        json: None,
                    });
                    crate::progress::info(&format!(
                        "    cell {} {}: {} in {:.0} s",
                        cell.name,
                        cell.format,
                        if o.passed() { "ok" } else { "FAILED" },
                        o.seconds
                    ));
                    results
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((i, o));
                }
            });
        }
    });
    let mut v = results.into_inner().unwrap_or_else(|e| e.into_inner());
    v.sort_by_key(|(i, _)| *i);
    v.into_iter().map(|(_, o)| o).collect()
}

/// The summary table.
pub fn render(outcomes: &[Outcome], wall: f64) -> String {
    let w = outcomes
        .iter()
        .map(|o| o.cell.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let mut s = format!(
        "{:<w$}  {:<10} {:>7} {:>10}  {:<18} {:<24} result\n",
        "cell", "format", "time", "size", "scan", "verify"
    );
    for o in outcomes {
        let scan = o
            .scan
            .as_ref()
            .map(|x| format!("{} pass, {} fail", x.pass, x.fail))
            .unwrap_or_else(|| "-".into());
        let verify = if o.verify.is_empty() {
            "-".to_string()
        } else {
            o.verify.join(" ")
        };
        s.push_str(&format!(
            "{:<w$}  {:<10} {:>5.0} s {:>10}  {:<18} {:<24} {}\n",
            o.cell.name,
            o.cell.format,
            o.seconds,
            format_size(o.bytes),
            scan,
            verify,
            match o.exit_code {
                Some(0) => "ok".to_string(),
                Some(c) => format!("FAILED (exit {c}; {})", o.log.display()),
                None => format!("FAILED ({})", o.error.as_deref().unwrap_or("no exit code")),
            }
        ));
    }
    let ok = outcomes.iter().filter(|o| o.passed()).count();
    s.push_str(&format!(
        "{ok} of {} cells ok in {wall:.0} s\n",
        outcomes.len()
    ));
    s
}

/// One JUnit report over every cell: a `testsuite` per cell with a
/// `testcase` for its build, one per verification boot, and one per
/// control of its scan (the one inside the booted image when there is
/// one, else the offline one).
pub fn junit(outcomes: &[Outcome]) -> String {
    use quick_xml::events::BytesText;
    let failures = outcomes.iter().filter(|o| !o.passed()).count();
    crate::scan::report::xml_document((b' ', 2), |w| {
        w.create_element("testsuites")
            .with_attribute(("name", "stemforge matrix"))
            .with_attribute(("failures", failures.to_string().as_str()))
            .write_inner_content(|w| {
                for o in outcomes {
                    let suite = format!("{}/{}", o.cell.name, o.cell.format);
                    let class = format!("stemforge.{}.{}", o.cell.name, o.cell.format);
                    let report = scan_report(o);
                    let controls = report.as_ref().map_or(0, |r| r.results.len());
                    let (control_fails, control_errors) = report
                        .as_ref()
                        .map_or((0, 0), |r| (r.summary.fail, r.summary.error));
                    let failures = usize::from(o.error.is_some())
                        + o.verify.iter().filter(|v| v.ends_with("FAILED")).count()
                        + control_fails;
                    w.create_element("testsuite")
                        .with_attribute(("name", suite.as_str()))
                        .with_attribute((
                            "tests",
                            (1 + o.verify.len() + controls).to_string().as_str(),
                        ))
                        .with_attribute(("failures", failures.to_string().as_str()))
                        .with_attribute(("errors", control_errors.to_string().as_str()))
                        .with_attribute(("time", format!("{:.1}", o.seconds).as_str()))
                        .write_inner_content(|w| {
                            let el = w
                                .create_element("testcase")
                                .with_attribute(("name", "build"))
                                .with_attribute(("classname", class.as_str()))
                                .with_attribute(("time", format!("{:.1}", o.seconds).as_str()));
                            match &o.error {
                                None => {
                                    el.write_empty()?;
                                }
                                Some(e) => {
                                    el.write_inner_content(|w| {
                                        w.create_element("failure")
                                            .with_attribute(("message", "the build failed"))
                                            .write_text_content(BytesText::new(e))?;
                                        Ok(())
                                    })?;
                                }
                            }
                            for v in &o.verify {
                                let el = w
                                    .create_element("testcase")
                                    .with_attribute(("name", format!("verify {v}").as_str()))
                                    .with_attribute(("classname", class.as_str()));
                                if v.ends_with("FAILED") {
                                    el.write_inner_content(|w| {
                                        w.create_element("failure")
                                            .with_attribute((
                                                "message",
                                                "the verification boot failed",
                                            ))
                                            .write_text_content(BytesText::new(
                                                &o.log.display().to_string(),
                                            ))?;
                                        Ok(())
                                    })?;
                                } else {
                                    el.write_empty()?;
                                }
                            }
                            for c in report.iter().flat_map(|r| &r.results) {
                                crate::scan::junit::testcase_in(
                                    w,
                                    c,
                                    &format!("{class}.{}", c.stage),
                                )?;
                            }
                            Ok(())
                        })?;
                }
                Ok(())
            })?;
        Ok(())
    })
}

/// The cell's scan report: the live one of its first boot, else offline.
fn scan_report(o: &Outcome) -> Option<crate::scan::Report> {
    let read = |p: &Path| -> Option<crate::scan::Report> {
        serde_json::from_slice(&std::fs::read(p).ok()?).ok()
    };
    read(&o.cell.out.join(format!("{}.scan.json", o.cell.name))).or_else(|| {
        read(
            &o.cell
                .out
                .join(format!("{}.offline-scan.json", o.cell.name)),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(profiles: &[&str], roles: &[&str], formats: &[&str]) -> MatrixOptions {
        let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect();
        MatrixOptions {
            profiles: v(profiles),
            roles: v(roles),
            formats: v(formats),
            jobs: 1,
            out: "m".into(),
            profiles_source: ProfileSource::Embedded,
            build_args: vec!["--verify".into(), "never".into()],
        }
    }

    #[test]
    fn cells_fan_out_and_name_their_outputs() {
        let c = cells(&opts(
            &["debian-bookworm", "ubuntu-noble"],
            &["base", "postgres"],
            &["raw", "vsphere"],
        ))
        .unwrap();
        assert_eq!(c.len(), 8);
        let pg = c
            .iter()
            .find(|c| c.name == "ubuntu-noble-postgres" && c.format == "vsphere")
            .unwrap();
        assert_eq!(pg.out, Path::new("m/ubuntu-noble-postgres/vsphere"));
        let line = pg.command.join(" ");
        assert!(
            line.contains("build --profile ubuntu-noble-postgres --format vmdk,ova --out m/ubuntu-noble-postgres/vsphere --json --verify never"),
            "{line}"
        );
    }

    #[test]
    fn unknown_profiles_roles_and_formats_are_refused() {
        for (p, r, f, word) in [
            ("debian-sid", "base", "raw", "--profiles"),
            ("debian-bookworm", "mysql", "raw", "--roles"),
            ("debian-bookworm", "base", "iso", "--formats"),
        ] {
            let e = cells(&opts(&[p], &[r], &[f])).unwrap_err();
            let ce = e.downcast_ref::<ConfigError>().expect("a config error");
            assert!(ce.to_string().contains(word), "{ce}");
        }
    }
}

#[cfg(test)]
mod junit_tests {
    use super::*;

    #[test]
    fn a_failed_cell_counts_as_a_failure_of_its_suite() {
        let cell = Cell {
            profile: "debian-bookworm".into(),
            role: BASE.into(),
            format: "raw".into(),
            name: "debian-bookworm".into(),
            out: "/nonexistent/cell".into(),
            command: vec![],
        };
        let o = Outcome {
            cell,
            exit_code: Some(2),
            seconds: 1.0,
            bytes: 0,
            scan: None,
            verify: vec!["kvm:FAILED".into()],
            error: Some("error: preflight failed".into()),
            log: "/nonexistent/cell/matrix-cell.log".into(),
            json: None,
        };
        let x = junit(&[o]);
        assert!(x.contains(r#"name="debian-bookworm/raw""#), "{x}");
        assert!(x.contains(r#"failures="2""#), "{x}");
        assert!(x.contains(r#"errors="0""#), "{x}");
        assert!(x.contains("preflight failed"), "{x}");
    }
}

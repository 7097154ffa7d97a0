//! Key paths into structured documents (daemon.json, a kubelet
//! configuration, `docker info`): `log-opts.tag`, `authentication.anonymous.enabled`,
//! `Mounts.0.Source`. Shared by the `json`, `yaml` and `docker` kinds.

use crate::scan::expect::{Expect, deserialize_expect_map};
use crate::scan::outcome::{Findings, Outcome};
use crate::scan::target::Target;
use serde::Deserialize;
use serde_json::Value;

/// A structured file and what its key paths must hold: the `json`
/// (`YAML = false`) and `yaml` kinds, which differ only in their parser.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Document<const YAML: bool> {
    pub path: String,
    #[serde(deserialize_with = "deserialize_expect_map")]
    pub keys: Vec<(String, Expect)>,
}

impl<const YAML: bool> Document<YAML> {
    pub fn validate(&self) -> Result<(), String> {
        if !self.path.starts_with('/') {
            return Err(format!("path `{}` must be absolute", self.path));
        }
        validate_keys(&self.keys)
    }

    pub fn describe(&self) -> String {
        format!("{}: {}", self.path, describe_keys(&self.keys))
    }

    /// A missing file fails; one that does not parse fails with the
    /// parser's position (its error names line and column), since the
    /// service reading it would refuse it.
    pub fn eval(&self, t: &Target) -> Outcome {
        let text = match t.read_optional(&self.path) {
            Ok(Some(s)) => s,
            Ok(None) => return Outcome::fail(format!("{}: does not exist", self.path)),
            Err(e) => return Outcome::error(format!("{}: {e}", self.path)),
        };
        let parsed = if YAML {
            crate::scan::kinds::yaml::parse(&text)
        } else {
            crate::scan::kinds::json::parse(&text)
        };
        let doc = match parsed {
            Ok(d) => d,
            Err(e) => return Outcome::fail(format!("{}{e}", self.path)),
        };
        let mut f = Findings::new();
        check_keys(&mut f, &doc, &self.keys, &self.path);
        f.finish()
    }
}

/// The value at a dotted path; a numeric component indexes an array.
pub fn lookup<'a>(doc: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(doc, |v, part| match v {
        Value::Object(m) => m.get(part),
        Value::Array(a) => part.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => None,
    })
}

/// A value as an expectation reads it: scalars as written, arrays as
/// their items separated by ", ", objects as compact JSON. `null` and
/// an empty list set nothing, so they read as not set.
pub fn render(v: &Value) -> Option<String> {
    Some(match v {
        Value::Null => return None,
        Value::Array(a) if a.is_empty() => return None,
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::Array(a) => a
            .iter()
            .map(|i| render(i).unwrap_or_default())
            .collect::<Vec<_>>()
            .join(", "),
        Value::Object(_) => v.to_string(),
    })
}

/// Test each key path of `doc` against its expectation; `at` names the
/// document in the evidence.
pub fn check_keys(f: &mut Findings, doc: &Value, keys: &[(String, Expect)], at: &str) {
    for (key, expect) in keys {
        let value = lookup(doc, key).and_then(render);
        match expect.test(value.as_deref()) {
            Ok(()) => f.ok(format!(
                "{at}: {key} = {}",
                value.as_deref().unwrap_or("(not set)")
            )),
            Err(why) => f.bad(format!("{at}: {key} {why}")),
        }
    }
}

/// Problems with a check's key list (empty, or a bad expectation).
pub fn validate_keys(keys: &[(String, Expect)]) -> Result<(), String> {
    if keys.is_empty() {
        return Err("name at least one key path under `keys`".into());
    }
    for (k, e) in keys {
        if k.is_empty() || k.split('.').any(str::is_empty) {
            return Err(format!("key path `{k}` has an empty component"));
        }
        e.validate().map_err(|why| format!("{k}: {why}"))?;
    }
    Ok(())
}

/// `keys` as one line for `describe`.
pub fn describe_keys(keys: &[(String, Expect)]) -> String {
    keys.iter()
        .map(|(k, e)| format!("{k} {}", e.describe()))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths_reach_into_objects_and_arrays() {
        let d = json!({"log-opts": {"tag": "x"}, "Mounts": [{"Source": "/run/docker.sock"}], "n": null});
        assert_eq!(lookup(&d, "log-opts.tag"), Some(&json!("x")));
        assert_eq!(
            lookup(&d, "Mounts.0.Source"),
            Some(&json!("/run/docker.sock"))
        );
        assert_eq!(lookup(&d, "Mounts.1.Source"), None);
        assert_eq!(lookup(&d, "log-opts.tag.more"), None);
        assert_eq!(render(&json!(["a", "b=c,d"])).unwrap(), "a, b=c,d");
        assert_eq!(render(&json!(false)).unwrap(), "false");
        assert_eq!(render(&json!(null)), None);
        assert_eq!(render(&json!([])), None);
        let mut f = Findings::new();
        check_keys(
            &mut f,
            &d,
            &[("log-opts.tag".into(), Expect::equals("y"))],
            "daemon.json",
        );
        assert!(f.has_failed());
    }
}

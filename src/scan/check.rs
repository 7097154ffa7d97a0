//! A control's check: one kind, or `all`/`any` of several.
//!
//! Kinds register themselves: a kind is one file under `kinds/` that
//! implements its checks' `validate`, `describe` and `eval` and ends with
//! `register_kind!("name", Type)`. Nothing here names them.

use super::outcome::{Outcome, Status};
use super::target::Target;
use serde::Deserialize;
use serde::de::{self, MapAccess, Visitor};
use std::sync::{Arc, OnceLock};

/// What every check kind does.
pub trait CheckKind: std::fmt::Debug + Send + Sync {
    /// Problems a loader reports (bad regex, relative path, empty test).
    fn validate(&self) -> Result<(), String>;
    /// What the check tests, in one line.
    fn describe(&self) -> String;
    /// The outcome on `t`, with the evidence that decided it.
    fn eval(&self, t: &Target) -> Outcome;
}

/// Reads one check of a kind from the YAML under its name.
pub type ParseKind =
    fn(&mut dyn erased_serde::Deserializer<'_>) -> Result<Arc<dyn CheckKind>, erased_serde::Error>;

/// A kind in the registry: its name in stage files and how to read one.
pub struct KindEntry {
    pub name: &'static str,
    pub parse: ParseKind,
}

inventory::collect!(KindEntry);

/// Register a check kind: `register_kind!("file", FileCheck)` in the
/// kind's own file. The type has inherent `validate`, `describe` and
/// `eval` methods and deserializes from the YAML under the kind's name.
#[macro_export]
macro_rules! register_kind {
    ($name:literal, $ty:ty) => {
        impl $crate::scan::check::CheckKind for $ty {
            fn validate(&self) -> Result<(), String> {
                <$ty>::validate(self)
            }
            fn describe(&self) -> String {
                <$ty>::describe(self)
            }
            fn eval(&self, t: &$crate::scan::target::Target) -> $crate::scan::outcome::Outcome {
                <$ty>::eval(self, t)
            }
        }
        inventory::submit! {
            $crate::scan::check::KindEntry {
                name: $name,
                parse: |d| {
                    let c: $ty = serde_yaml::with::singleton_map_recursive::deserialize(d)?;
                    Ok(std::sync::Arc::new(c))
                },
            }
        }
    };
}

/// The registered kinds' names, sorted.
pub fn kind_names() -> &'static [&'static str] {
    static NAMES: OnceLock<Vec<&'static str>> = OnceLock::new();
    NAMES.get_or_init(|| {
        let mut n: Vec<&'static str> = inventory::iter::<KindEntry>
            .into_iter()
            .map(|k| k.name)
            .chain(["all", "any"])
            .collect();
        n.sort_unstable();
        n
    })
}

#[derive(Debug, Clone)]
pub enum Check {
    /// One registered kind, by name.
    Kind(&'static str, Arc<dyn CheckKind>),
    /// Every check must pass.
    All(Vec<Check>),
    /// At least one check must pass.
    Any(Vec<Check>),
}

/// Checks are written as single-key maps (`file: {...}`), nested ones too.
pub fn deserialize_check<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Check, D::Error> {
    Check::deserialize(d)
}

/// Parse a check from YAML text (tests, tools).
pub fn parse_check(text: &str) -> Result<Check, serde_yaml::Error> {
    deserialize_check(serde_yaml::Deserializer::from_str(text))
}

impl<'de> Deserialize<'de> for Check {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Check, D::Error> {
        d.deserialize_map(CheckVisitor)
    }
}

struct CheckVisitor;

impl<'de> Visitor<'de> for CheckVisitor {
    type Value = Check;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a check: a map with one kind as its key")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Check, A::Error> {
        let Some(key) = map.next_key::<String>()? else {
            return Err(de::Error::custom(
                "a check names one kind; this one is empty",
            ));
        };
        let check = match key.as_str() {
            "all" => Check::All(map.next_value()?),
            "any" => Check::Any(map.next_value()?),
            name => {
                let entry = inventory::iter::<KindEntry>
                    .into_iter()
                    .find(|k| k.name == name)
                    .ok_or_else(|| de::Error::unknown_variant(name, kind_names()))?;
                Check::Kind(entry.name, map.next_value_seed(KindSeed(entry))?)
            }
        };
        if let Some(extra) = map.next_key::<String>()? {
            return Err(de::Error::custom(format!(
                "a check names one kind; `{extra}` is a second one (use `all:` or `any:`)"
            )));
        }
        Ok(check)
    }
}

struct KindSeed(&'static KindEntry);

impl<'de> de::DeserializeSeed<'de> for KindSeed {
    type Value = Arc<dyn CheckKind>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        let mut erased = <dyn erased_serde::Deserializer>::erase(d);
        (self.0.parse)(&mut erased).map_err(de::Error::custom)
    }
}

impl Check {
    /// The kind's name as written in stage files.
    pub fn kind(&self) -> &'static str {
        match self {
            Check::Kind(name, _) => name,
            Check::All(_) => "all",
            Check::Any(_) => "any",
        }
    }

    /// Problems a loader reports (bad regex, relative path, empty test).
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Check::Kind(_, c) => c.validate(),
            Check::All(cs) | Check::Any(cs) => {
                if cs.is_empty() {
                    return Err(format!("`{}` needs at least one check", self.kind()));
                }
                cs.iter().try_for_each(Check::validate)
            }
        }
    }

    /// What the check tests, in one line.
    pub fn describe(&self) -> String {
        match self {
            Check::Kind(_, c) => c.describe(),
            Check::All(cs) => cs
                .iter()
                .map(Check::describe)
                .collect::<Vec<_>>()
                .join(" AND "),
            Check::Any(cs) => cs
                .iter()
                .map(Check::describe)
                .collect::<Vec<_>>()
                .join(" OR "),
        }
    }

    pub fn eval(&self, t: &Target) -> Outcome {
        match self {
            Check::Kind(_, c) => c.eval(t),
            Check::All(cs) => {
                let outs: Vec<Outcome> = cs.iter().map(|c| c.eval(t)).collect();
                let worst = [Status::Error, Status::Fail, Status::Pass]
                    .into_iter()
                    .find(|s| outs.iter().any(|o| o.status == *s))
                    .unwrap_or(Status::NotApplicable);
                Outcome::new(worst, outs.into_iter().flat_map(|o| o.evidence).collect())
            }
            Check::Any(cs) => {
                let outs: Vec<Outcome> = cs.iter().map(|c| c.eval(t)).collect();
                let status = if outs.iter().any(|o| o.status == Status::Pass) {
                    Status::Pass
                } else if outs.iter().any(|o| o.status == Status::Error) {
                    Status::Error
                } else if outs.iter().any(|o| o.status == Status::Fail) {
                    Status::Fail
                } else {
                    Status::NotApplicable
                };
                Outcome::new(status, outs.into_iter().flat_map(|o| o.evidence).collect())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_kind_is_rejected_with_the_known_ones() {
        let e = parse_check("{ sshdd: { X: y } }").unwrap_err().to_string();
        assert!(e.contains("unknown variant `sshdd`"), "{e}");
        assert!(e.contains("sshd"), "{e}");
    }

    #[test]
    fn combinators() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a"), "x").unwrap();
        let t = Target::root(d.path()).unwrap();
        let all: Check =
            parse_check("all: [ { file: { path: /a } }, { file: { path: /b } } ]").unwrap();
        all.validate().unwrap();
        assert_eq!(all.eval(&t).status, Status::Fail);
        let any: Check =
            parse_check("any: [ { file: { path: /a } }, { file: { path: /b } } ]").unwrap();
        assert_eq!(any.eval(&t).status, Status::Pass);
        let empty: Check = parse_check("all: []").unwrap();
        assert!(empty.validate().is_err());
    }
}

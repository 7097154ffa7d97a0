//! What a configured value must be: `"no"` (equal), or a map of tests
//! (`{ max: 3 }`, `{ subset_of: [aes128-ctr, aes256-ctr] }`, ...).
//! Comparisons ignore ASCII case and collapse whitespace, as sshd, auditd
//! and sysctl do for the values they accept.

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "scalar_opt"
    )]
    pub equals: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "scalar_list_opt"
    )]
    pub one_of: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<i64>,
    /// A comma-separated list whose items all come from this set.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "scalar_list_opt"
    )]
    pub subset_of: Option<Vec<String>>,
    /// A comma- or space-separated list that contains all of these.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "scalar_list_opt"
    )]
    pub contains: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matches: Option<String>,
    /// The key must not be set at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub absent: Option<bool>,
}

impl Expect {
    pub fn equals(v: &str) -> Self {
        Expect {
            equals: Some(v.to_string()),
            ..Default::default()
        }
    }

    /// Whether the check wants the key unset.
    pub fn wants_absent(&self) -> bool {
        self.absent == Some(true)
    }

    /// Problems with the expectation itself (bad regex, empty test).
    pub fn validate(&self) -> Result<(), String> {
        if let Some(re) = &self.matches {
            regex::Regex::new(re).map_err(|e| format!("invalid regex {re:?}: {e}"))?;
        }
        let any = self.equals.is_some()
            || self.one_of.is_some()
            || self.min.is_some()
            || self.max.is_some()
            || self.subset_of.is_some()
            || self.contains.is_some()
            || self.matches.is_some()
            || self.absent.is_some();
        if !any {
            return Err("the expected value is empty".into());
        }
        if self.absent.is_some()
            && (self.equals.is_some() || self.one_of.is_some() || self.min.is_some())
        {
            return Err("`absent` cannot be combined with a value test".into());
        }
        Ok(())
    }

    /// Test a value (`None`: not set). `Err` explains the mismatch.
    pub fn test(&self, value: Option<&str>) -> Result<(), String> {
        let Some(raw) = value else {
            return if self.absent == Some(true) {
                Ok(())
            } else {
                Err("not set".into())
            };
        };
        if self.absent == Some(true) {
            return Err(format!("set to {raw:?}; it must not be set"));
        }
        let v = normalize(raw);
        if let Some(e) = &self.equals {
            if v != normalize(e) {
                return Err(format!("is {raw:?}, expected {e:?}"));
            }
        }
        if let Some(set) = &self.one_of {
            if !set.iter().any(|e| normalize(e) == v) {
                return Err(format!("is {raw:?}, expected one of {}", set.join(", ")));
            }
        }
        if self.min.is_some() || self.max.is_some() {
            let n = parse_int(&v).ok_or_else(|| format!("is {raw:?}, expected a number"))?;
            if let Some(min) = self.min {
                if n < min {
                    return Err(format!("is {n}, expected at least {min}"));
                }
            }
            if let Some(max) = self.max {
                if n > max {
                    return Err(format!("is {n}, expected at most {max}"));
                }
            }
        }
        if let Some(allowed) = &self.subset_of {
            let allowed: Vec<String> = allowed.iter().map(|a| normalize(a)).collect();
            let items = list_items(&v);
            let bad: Vec<&String> = items.iter().filter(|i| !allowed.contains(i)).collect();
            if items.is_empty() {
                return Err("is empty".into());
            }
            if !bad.is_empty() {
                return Err(format!(
                    "contains {} not allowed (allowed: {})",
                    bad.iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    allowed.join(", ")
                ));
            }
        }
        if let Some(needed) = &self.contains {
            let items = list_items(&v);
            let missing: Vec<String> = needed
                .iter()
                .map(|n| normalize(n))
                .filter(|n| !items.contains(n))
                .collect();
            if !missing.is_empty() {
                return Err(format!("is {raw:?}, missing {}", missing.join(", ")));
            }
        }
        if let Some(re) = &self.matches {
            let re = regex::Regex::new(re).map_err(|e| e.to_string())?;
            if !re.is_match(raw) {
                return Err(format!("is {raw:?}, does not match /{}/", re.as_str()));
            }
        }
        Ok(())
    }

    /// A short description of what is expected, for reports.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(e) = &self.equals {
            parts.push(format!("= {e}"));
        }
        if let Some(s) = &self.one_of {
            parts.push(format!("one of {}", s.join("|")));
        }
        if let Some(m) = self.min {
            parts.push(format!(">= {m}"));
        }
        if let Some(m) = self.max {
            parts.push(format!("<= {m}"));
        }
        if let Some(s) = &self.subset_of {
            parts.push(format!("subset of {}", s.join(",")));
        }
        if let Some(s) = &self.contains {
            parts.push(format!("contains {}", s.join(",")));
        }
        if let Some(m) = &self.matches {
            parts.push(format!("matches /{m}/"));
        }
        if self.absent == Some(true) {
            parts.push("not set".into());
        }
        parts.join(" and ")
    }
}

fn normalize(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_ascii_lowercase()
}

fn list_items(v: &str) -> Vec<String> {
    v.split([',', ' '])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

fn parse_int(v: &str) -> Option<i64> {
    let t = v.trim();
    if let Some(h) = t.strip_prefix("0x") {
        return i64::from_str_radix(h, 16).ok();
    }
    t.parse().ok()
}

/// `value: "no"`, `value: 6` or `value: { max: 3 }`.
pub fn deserialize_expect<'de, D: Deserializer<'de>>(d: D) -> Result<Expect, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Expect;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a value, or a map of tests (equals, one_of, min, max, subset_of, contains, matches, absent)")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Expect, E> {
            Ok(Expect::equals(v))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Expect, E> {
            Ok(Expect::equals(&v.to_string()))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Expect, E> {
            Ok(Expect::equals(&v.to_string()))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Expect, E> {
            Ok(Expect::equals(&v.to_string()))
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<Expect, E> {
            Ok(Expect::equals(if v { "true" } else { "false" }))
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Expect, A::Error> {
            Expect::deserialize(de::value::MapAccessDeserializer::new(map))
        }
    }
    d.deserialize_any(V)
}

/// A map of names to expectations (`sshd: { PermitRootLogin: "no" }`).
pub fn deserialize_expect_map<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Vec<(String, Expect)>, D::Error> {
    struct Wrapped(Expect);
    impl<'de> Deserialize<'de> for Wrapped {
        fn deserialize<D2: Deserializer<'de>>(d: D2) -> Result<Self, D2::Error> {
            deserialize_expect(d).map(Wrapped)
        }
    }
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<(String, Expect)>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a map of keywords to expected values")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some((k, Wrapped(v))) = map.next_entry::<String, Wrapped>()? {
                out.push((k, v));
            }
            Ok(out)
        }
    }
    d.deserialize_map(V)
}

/// A scalar of any YAML type, as text.
fn scalar_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(Some(scalar(d)?))
}

fn scalar<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a scalar value")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<String, E> {
            Ok(v.to_string())
        }
    }
    d.deserialize_any(V)
}

fn scalar_list_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    struct Item(String);
    impl<'de> Deserialize<'de> for Item {
        fn deserialize<D2: Deserializer<'de>>(d: D2) -> Result<Self, D2::Error> {
            scalar(d).map(Item)
        }
    }
    let items: Vec<Item> = Vec::deserialize(d)?;
    Ok(Some(items.into_iter().map(|i| i.0).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct W {
        #[serde(deserialize_with = "deserialize_expect")]
        value: Expect,
    }

    fn parse(y: &str) -> Expect {
        serde_yaml::from_str::<W>(y).unwrap().value
    }

    #[test]
    fn scalars_mean_equals() {
        assert_eq!(parse("value: no").equals.as_deref(), Some("no"));
        assert_eq!(parse("value: 6").equals.as_deref(), Some("6"));
        assert!(parse("value: \"no\"").test(Some("No")).is_ok());
        assert!(parse("value: \"no\"").test(Some("yes")).is_err());
        assert!(parse("value: 0").test(None).is_err());
    }

    #[test]
    fn ranges_sets_and_lists() {
        let e = parse("value: { max: 3 }");
        assert!(e.test(Some("3")).is_ok());
        assert!(e.test(Some("4")).unwrap_err().contains("at most 3"));
        let e = parse("value: { min: 1, max: 900 }");
        assert!(e.test(Some("0")).is_err());
        assert!(e.test(Some("900")).is_ok());
        let e = parse("value: { subset_of: [aes128-ctr, aes192-ctr, aes256-ctr] }");
        assert!(e.test(Some("aes256-ctr,aes128-ctr")).is_ok());
        assert!(
            e.test(Some("chacha20-poly1305@openssh.com,aes128-ctr"))
                .unwrap_err()
                .contains("chacha20")
        );
        let e = parse("value: { one_of: [INFO, VERBOSE] }");
        assert!(e.test(Some("verbose")).is_ok());
        assert!(e.test(Some("DEBUG")).is_err());
        let e = parse("value: { contains: [nodev, noexec] }");
        assert!(e.test(Some("rw,nodev,noexec")).is_ok());
        assert!(e.test(Some("rw,nodev")).is_err());
        let e = parse("value: { absent: true }");
        assert!(e.test(None).is_ok());
        assert!(e.test(Some("x")).is_err());
        let e = parse("value: { matches: '^/etc/issue' }");
        assert!(e.test(Some("/etc/issue.net")).is_ok());
    }

    #[test]
    fn unknown_test_is_an_error() {
        assert!(serde_yaml::from_str::<W>("value: { maxx: 3 }").is_err());
        assert!(Expect::default().validate().is_err());
        let bad = Expect {
            matches: Some("(".into()),
            ..Default::default()
        };
        assert!(bad.validate().is_err());
    }
}

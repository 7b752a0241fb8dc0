//! Fuzzing of every parser that takes outside input, on stable Rust: each
//! parser's own module has a `fuzz` test that feeds it arbitrary input
//! (random bytes, and structured input close to valid) and checks that it
//! answers — an error is fine, a panic or a wrong answer is a finding.
//!
//! The test command runs each target for `ARBTEST_BUDGET_MS` (set by
//! `scripts/test.sh`); `scripts/fuzz.sh` runs them for longer. A failure
//! prints its seed: `ARBTEST_SEED=… cargo test --lib fuzz` replays it.

use arbtest::arbitrary::{Result, Unstructured};
use serde_json::{Map, Value};

/// An arbitrary JSON value, at most `depth` levels deep, whose strings
/// and keys come from `words` or are arbitrary.
pub(crate) fn json_value(u: &mut Unstructured<'_>, words: &[&str], depth: u32) -> Result<Value> {
    let string = |u: &mut Unstructured<'_>| -> Result<String> {
        Ok(if u.arbitrary()? {
            (*u.choose(words)?).to_owned()
        } else {
            u.arbitrary()?
        })
    };
    Ok(match u.int_in_range(0..=if depth == 0 { 3 } else { 5 })? {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => serde_json::json!(u.arbitrary::<i64>()?),
        3 => Value::String(string(u)?),
        4 => {
            let items = u.int_in_range(0..=4)?;
            Value::Array(
                (0..items)
                    .map(|_| json_value(u, words, depth - 1))
                    .collect::<Result<_>>()?,
            )
        }
        _ => {
            let mut object = Map::new();
            for _ in 0..u.int_in_range(0..=5)? {
                object.insert(string(u)?, json_value(u, words, depth - 1)?);
            }
            Value::Object(object)
        }
    })
}

/// Arbitrary text: a JSON value close to what `words` suggest, or raw
/// bytes taken as (lossy) UTF-8.
pub(crate) fn text(u: &mut Unstructured<'_>, words: &[&str]) -> Result<String> {
    if u.arbitrary()? {
        Ok(json_value(u, words, 3)?.to_string())
    } else {
        Ok(String::from_utf8_lossy(u.arbitrary::<&[u8]>()?).into_owned())
    }
}

//! Who may subscribe to what.
//!
//! A topic is dot-separated segments (`orders.alice`, `news.sport`). A
//! pattern matches topics segment by segment: a literal segment matches
//! itself, `*` any one segment, `**` (last only) one or more segments, and
//! `{user}` the connection's own user id as one whole segment. So
//! `orders.{user}` lets each user read their own orders and nobody else's.
//! `{user}` matches nothing for a user id with a dot (`bob.smith`): its
//! topics would overlap another user's (`orders.bob.smith` is user `bob`'s
//! sub-topic under `orders.{user}.*`).
//!
//! A client may subscribe to a topic if its tenant's settings allow it
//! (`[tenants.x.subscriptions] allow = [...]`) or if what authenticated it
//! granted it: a JWT's `topics` claim, or a plugin's identity, where an
//! entry with a wildcard or `{user}` is a pattern and a plain entry is both
//! an initial subscription and a grant. Tenants whose clients are
//! authenticated deny everything else. The development authenticator, which
//! trusts any user id anyway, allows every topic.

use super::TenantSettingsError;

/// One segment of a [`TopicPattern`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// `*`: any one segment.
    One,
    /// `**`: one or more segments (last only).
    Rest,
    /// `{user}`: the connection's user id.
    User,
}

/// A parsed topic pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPattern {
    segments: Vec<Segment>,
}

/// A topic pattern that does not parse, and why.
#[derive(Debug, thiserror::Error)]
#[error("{pattern:?}: {problem}")]
pub struct PatternError {
    pattern: String,
    problem: PatternProblem,
}

#[derive(Debug, thiserror::Error)]
enum PatternProblem {
    #[error("a pattern is 1 to {MAX_PATTERN_BYTES} bytes")]
    Length,
    #[error("an empty segment")]
    EmptySegment,
    #[error("`**` may only be the last segment")]
    RestNotLast,
    #[error("`*`, `**` and `{{user}}` must be whole segments")]
    PartSegment,
}

/// Longest pattern or topic, in bytes (as long as a subscribable topic).
const MAX_PATTERN_BYTES: usize = 256;

impl TopicPattern {
    /// Parses `text`; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, PatternError> {
        let fail = |problem| PatternError {
            pattern: text.to_owned(),
            problem,
        };
        if text.is_empty() || text.len() > MAX_PATTERN_BYTES {
            return Err(fail(PatternProblem::Length));
        }
        let parts: Vec<&str> = text.split('.').collect();
        let mut segments = Vec::with_capacity(parts.len());
        for (index, part) in parts.iter().enumerate() {
            let segment = match *part {
                "" => return Err(fail(PatternProblem::EmptySegment)),
                "*" => Segment::One,
                "**" if index + 1 == parts.len() => Segment::Rest,
                "**" => return Err(fail(PatternProblem::RestNotLast)),
                "{user}" => Segment::User,
                literal if literal.contains(['*', '{', '}']) => {
                    return Err(fail(PatternProblem::PartSegment));
                }
                literal => Segment::Literal(literal.to_owned()),
            };
            segments.push(segment);
        }
        Ok(Self { segments })
    }

    /// True if `text` is a pattern rather than one plain topic.
    pub fn is_pattern(text: &str) -> bool {
        text.contains(['*', '{'])
    }

    /// True if `topic` matches, for a connection of `user`.
    pub fn matches(&self, topic: &str, user: &str) -> bool {
        let topic: Vec<&str> = topic.split('.').collect();
        let mut at = 0;
        for (index, segment) in self.segments.iter().enumerate() {
            match segment {
                Segment::Literal(literal) => {
                    if topic.get(at) != Some(&literal.as_str()) {
                        return false;
                    }
                    at += 1;
                }
                Segment::One => {
                    if topic.get(at).is_none_or(|s| s.is_empty()) {
                        return false;
                    }
                    at += 1;
                }
                Segment::Rest => {
                    debug_assert_eq!(index + 1, self.segments.len());
                    return at < topic.len() && topic[at..].iter().all(|s| !s.is_empty());
                }
                // Exactly one segment, literally (a `*` in a user id is no
                // wildcard). A user id with a dot matches none: spanning
                // segments, `orders.{user}.*` of user `bob` would match
                // `orders.bob.smith`, user `bob.smith`'s `orders.{user}`.
                Segment::User => {
                    if user.contains('.') || topic.get(at) != Some(&user) {
                        return false;
                    }
                    at += 1;
                }
            }
        }
        at == topic.len()
    }
}

/// A tenant's subscription rules.
#[derive(Debug, Clone, Default)]
pub struct SubscriptionRules {
    allow: Vec<TopicPattern>,
}

impl SubscriptionRules {
    /// The rules of tenant `tenant` from its `allow` patterns.
    pub fn new(tenant: &str, allow: &[String]) -> Result<Self, TenantSettingsError> {
        let allow = allow
            .iter()
            .map(|text| TopicPattern::parse(text))
            .collect::<Result<_, _>>()
            .map_err(|problem: PatternError| TenantSettingsError {
                field: format!("tenants.{tenant}.subscriptions.allow"),
                problem: problem.to_string(),
            })?;
        Ok(Self { allow })
    }

    /// True if the tenant's own rules allow `user` to subscribe to `topic`.
    pub fn allow(&self, topic: &str, user: &str) -> bool {
        self.allow.iter().any(|p| p.matches(topic, user))
    }
}

/// What authenticated a client granted it to subscribe to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// Any topic: the development authenticator, which trusts any user id.
    Anything,
    /// These patterns (and the plain topics it started with), besides what
    /// the tenant's rules allow.
    Patterns(Vec<TopicPattern>),
}

impl Default for Grant {
    fn default() -> Self {
        Self::Patterns(Vec::new())
    }
}

impl Grant {
    /// Splits entries from a token or a plugin into initial topics (plain
    /// entries) and a grant (every entry; invalid patterns are ignored).
    pub fn from_entries(entries: Vec<String>) -> (Vec<String>, Self) {
        let patterns = entries
            .iter()
            .filter_map(|entry| TopicPattern::parse(entry).ok())
            .collect();
        let topics = entries
            .into_iter()
            .filter(|entry| !TopicPattern::is_pattern(entry))
            .collect();
        (topics, Self::Patterns(patterns))
    }

    /// The topics and patterns it holds (none for "anything").
    pub fn count(&self) -> usize {
        match self {
            Self::Anything => 0,
            Self::Patterns(patterns) => patterns.len(),
        }
    }

    /// True if this grant covers `topic` for `user`.
    pub fn covers(&self, topic: &str, user: &str) -> bool {
        match self {
            Self::Anything => true,
            Self::Patterns(patterns) => patterns.iter().any(|p| p.matches(topic, user)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(pattern: &str, topic: &str, user: &str) -> bool {
        TopicPattern::parse(pattern).unwrap().matches(topic, user)
    }

    #[test]
    fn patterns_match_segment_by_segment() {
        assert!(matches("news.*", "news.sport", "u"));
        assert!(!matches("news.*", "news", "u"));
        assert!(!matches("news.*", "news.sport.live", "u"));
        assert!(matches("news.**", "news.sport.live", "u"));
        assert!(!matches("news.**", "news", "u"));
        assert!(matches("orders.{user}", "orders.alice", "alice"));
        assert!(!matches("orders.{user}", "orders.alice", "mallory"));
        assert!(!matches("orders.{user}.*", "orders.a.b.paid", "a.b"));
        // One segment: user `bob.smith` has no `orders.{user}`, so that
        // `orders.bob.smith` is only ever user `bob`'s sub-topic.
        assert!(!matches("orders.{user}", "orders.bob.smith", "bob.smith"));
        assert!(matches("orders.{user}.*", "orders.bob.smith", "bob"));
        assert!(matches("orders.{user}.*", "orders.bob.paid", "bob"));
        assert!(!matches("orders.{user}", "orders.anything", "*"));
        assert!(!matches("news.*", "news.", "u"));
    }

    #[test]
    fn bad_patterns_are_refused_with_a_reason() {
        for bad in ["", "a..b", "a.**.b", "news*", "a.{user"] {
            assert!(TopicPattern::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn plain_entries_are_initial_topics_and_all_are_granted() {
        let (topics, grant) = Grant::from_entries(vec!["news".into(), "orders.{user}".into()]);
        assert_eq!(topics, ["news"]);
        assert!(grant.covers("news", "ann"));
        assert!(grant.covers("orders.ann", "ann"));
        assert!(!grant.covers("orders.bob", "ann"));
    }

    #[test]
    fn fuzz_patterns_and_topics_never_panic_and_literals_match_themselves() {
        const WORDS: &[&str] = &["*", "**", "{user}", "news", "orders", ".", "a.b", ""];
        arbtest::arbtest(|u| {
            let parts: Vec<&str> = (0..u.int_in_range(0..=5)?)
                .map(|_| u.choose(WORDS).copied())
                .collect::<arbtest::arbitrary::Result<_>>()?;
            let text = if u.arbitrary()? {
                parts.join(".")
            } else {
                u.arbitrary()?
            };
            let topic: String = u.arbitrary()?;
            let user: String = u.arbitrary()?;
            if let Ok(pattern) = TopicPattern::parse(&text) {
                let _ = pattern.matches(&topic, &user);
                if !TopicPattern::is_pattern(&text) {
                    assert!(pattern.matches(&text, &user), "{text:?} matches itself");
                }
            }
            let _ = Grant::from_entries(vec![text, topic])
                .1
                .covers("news.x", &user);
            Ok(())
        })
        .run();
    }
}

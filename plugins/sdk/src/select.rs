//! Choosing sites from user-written target lists and per-label pattern overrides.

use crate::graph::{GraphView, Site, SiteKind, SiteRef};
use regex::Regex;

/// A set of sites described by a user-written list, such as `targets = ["q", "v"]`.
///
/// Each entry is, in order of precedence: a site kind name (`q`, `ffn_down`, `norm`, ...);
/// a group (`attention` = q k v o qkv, `ffn` = the four ffn kinds, `all` or HF PEFT's
/// `all-linear` = every linear site, i.e. every kind but `norm`); otherwise a regular expression searched (unanchored)
/// in the site's [`Site::display_name`]. A site is selected when any entry matches.
#[derive(Debug, Clone)]
pub struct SiteSelector {
    kinds: Vec<SiteKind>,
    patterns: Vec<Regex>,
}

impl SiteSelector {
    /// Parses `entries`; errors name an entry that is neither a kind, a group nor a valid
    /// regular expression.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<SiteSelector, String> {
        let mut kinds = Vec::new();
        let mut patterns = Vec::new();
        for entry in entries.iter().map(AsRef::as_ref) {
            match entry {
                "attention" => kinds.extend(SiteKind::ALL.into_iter().filter(|k| k.is_attention())),
                "ffn" => kinds.extend(SiteKind::ALL.into_iter().filter(|k| k.is_ffn())),
                "all" | "all-linear" => {
                    kinds.extend(SiteKind::ALL.into_iter().filter(|k| k.is_linear()))
                }
                _ => match SiteKind::from_name(entry) {
                    Some(kind) => kinds.push(kind),
                    None => patterns.push(
                        Regex::new(entry)
                            .map_err(|e| format!("has an invalid pattern \"{entry}\": {e}"))?,
                    ),
                },
            }
        }
        Ok(SiteSelector { kinds, patterns })
    }

    /// True when `site` is selected.
    pub fn matches(&self, site: &Site) -> bool {
        self.kinds.contains(&site.kind)
            || self
                .patterns
                .iter()
                .any(|p| p.is_match(site.display_name()))
    }

    /// The selected sites of `graph`, in graph order.
    pub fn select<'g>(&self, graph: &'g GraphView) -> Vec<SiteRef<'g>> {
        graph.sites().filter(|s| self.matches(s.site)).collect()
    }

    /// True when the list was empty: nothing is selected.
    pub fn is_empty(&self) -> bool {
        self.kinds.is_empty() && self.patterns.is_empty()
    }
}

/// Ordered `(regular expression, value)` pairs; a lookup returns the value of the first
/// pattern found (unanchored search) in the text.
#[derive(Debug, Clone)]
pub struct PatternMap<T> {
    entries: Vec<(Regex, T)>,
}

impl<T> PatternMap<T> {
    /// Compiles the patterns of `pairs`, keeping their order; errors name the first invalid
    /// pattern.
    pub fn new(pairs: Vec<(String, T)>) -> Result<PatternMap<T>, String> {
        let entries = pairs
            .into_iter()
            .map(|(pattern, value)| {
                Regex::new(&pattern)
                    .map(|re| (re, value))
                    .map_err(|e| format!("has an invalid pattern \"{pattern}\": {e}"))
            })
            .collect::<Result<_, _>>()?;
        Ok(PatternMap { entries })
    }

    /// The value of the first pattern found in `text`.
    pub fn get(&self, text: &str) -> Option<&T> {
        self.entries
            .iter()
            .find(|(re, _)| re.is_match(text))
            .map(|(_, v)| v)
    }

    /// The value of the first pattern found in `site`'s [`Site::display_name`].
    pub fn for_site(&self, site: &Site) -> Option<&T> {
        self.get(site.display_name())
    }

    /// True when there are no pairs.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

//! Arithmetic on [`Dim`]s: fixed sizes fold, symbols combine into canonical new symbols
//! (`a + b`, `a*b`, `min(a, b)`), and what cannot be expressed becomes [`Dim::Unknown`].
//!
//! Symbols stand for dimension sizes, so they are assumed non-negative: `max(0, s) = s`, and a
//! symbol never equals a negative constant.

use crate::ir::Dim;

/// `a + b`. Sums of symbols become one symbol whose terms are sorted, so `a + b` and `b + a`
/// compare equal.
pub fn add(a: &Dim, b: &Dim) -> Dim {
    match (a, b) {
        (Dim::Fixed(x), Dim::Fixed(y)) => x.checked_add(*y).map_or(Dim::Unknown, Dim::Fixed),
        (Dim::Unknown, _) | (_, Dim::Unknown) => Dim::Unknown,
        (other, Dim::Fixed(0)) | (Dim::Fixed(0), other) => other.clone(),
        _ => {
            let mut terms = sum_terms(a);
            terms.extend(sum_terms(b));
            sum_of(terms)
        }
    }
}

/// `a - b`, when it can be expressed: fixed sizes, `x - 0`, `x - x`, and removing terms from a
/// sum (`(past + sequence) - past = sequence`, `s - (s + -1) = 1`).
pub fn sub(a: &Dim, b: &Dim) -> Dim {
    match (a, b) {
        (Dim::Fixed(x), Dim::Fixed(y)) => x.checked_sub(*y).map_or(Dim::Unknown, Dim::Fixed),
        (Dim::Unknown, _) | (_, Dim::Unknown) => Dim::Unknown,
        (other, Dim::Fixed(0)) => other.clone(),
        _ if a == b => Dim::Fixed(0),
        _ => {
            let mut terms = sum_terms(a);
            for term in sum_terms(b) {
                if let Ok(n) = term.parse::<i64>() {
                    match n.checked_neg() {
                        Some(negated) => terms.push(negated.to_string()),
                        None => return Dim::Unknown,
                    }
                    continue;
                }
                match terms.iter().position(|t| *t == term) {
                    Some(position) => {
                        terms.remove(position);
                    }
                    None => return Dim::Unknown,
                }
            }
            sum_of(terms)
        }
    }
}

/// `a * b`. Products of symbols become one symbol with sorted factors (`batch*sequence`).
pub fn mul(a: &Dim, b: &Dim) -> Dim {
    match (a, b) {
        (Dim::Fixed(x), Dim::Fixed(y)) => x.checked_mul(*y).map_or(Dim::Unknown, Dim::Fixed),
        (Dim::Fixed(0), _) | (_, Dim::Fixed(0)) => Dim::Fixed(0),
        (Dim::Unknown, _) | (_, Dim::Unknown) => Dim::Unknown,
        (other, Dim::Fixed(1)) | (Dim::Fixed(1), other) => other.clone(),
        _ => match (Monomial::of(a), Monomial::of(b)) {
            (Some(x), Some(y)) => x.times(&y).map_or(Dim::Unknown, Monomial::into_dim),
            _ => Dim::Unknown,
        },
    }
}

/// Integer `a / b`, truncating like ONNX's integer `Div` for fixed sizes; symbolic quotients only
/// when exact (`batch*sequence / sequence = batch`).
pub fn div(a: &Dim, b: &Dim) -> Dim {
    match (a, b) {
        (_, Dim::Fixed(0)) => Dim::Unknown,
        (Dim::Fixed(x), Dim::Fixed(y)) => x.checked_div(*y).map_or(Dim::Unknown, Dim::Fixed),
        (Dim::Unknown, _) | (_, Dim::Unknown) => Dim::Unknown,
        (other, Dim::Fixed(1)) => other.clone(),
        _ if a == b => Dim::Fixed(1),
        _ => match (Monomial::of(a), Monomial::of(b)) {
            (Some(x), Some(y)) => x.divided_by(&y).map_or(Dim::Unknown, Monomial::into_dim),
            _ => Dim::Unknown,
        },
    }
}

/// `min(a, b)`; a new `min(..)` symbol when the operands are different symbols.
pub fn min(a: &Dim, b: &Dim) -> Dim {
    extremum(a, b, "min", |x, y| x.min(y))
}

/// `max(a, b)`; a new `max(..)` symbol when the operands are different symbols.
pub fn max(a: &Dim, b: &Dim) -> Dim {
    extremum(a, b, "max", |x, y| x.max(y))
}

fn extremum(a: &Dim, b: &Dim, name: &str, pick: fn(i64, i64) -> i64) -> Dim {
    match (a, b) {
        (Dim::Fixed(x), Dim::Fixed(y)) => Dim::Fixed(pick(*x, *y)),
        _ if a == b => a.clone(),
        (Dim::Unknown, _) | (_, Dim::Unknown) => Dim::Unknown,
        (Dim::Fixed(n), symbol) | (symbol, Dim::Fixed(n)) if *n <= 0 => {
            if name == "max" {
                symbol.clone()
            } else {
                Dim::Fixed(*n)
            }
        }
        _ => {
            let mut operands = [a.to_string(), b.to_string()];
            operands.sort();
            Dim::Symbol(format!("{name}({}, {})", operands[0], operands[1]))
        }
    }
}

/// The product of `dims` (1 for none).
pub fn product<'d>(dims: impl IntoIterator<Item = &'d Dim>) -> Dim {
    dims.into_iter()
        .fold(Dim::Fixed(1), |total, dim| mul(&total, dim))
}

/// Whether a symbol is a plain name (`batch`, `sequence_length`) rather than an expression.
pub fn is_plain_symbol(symbol: &str) -> bool {
    !symbol.is_empty()
        && symbol
            .chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == '.')
}

/// The size two broadcast dimensions agree on. A fixed size other than 1 wins over a symbol, a
/// plain symbol over an expression (both must be equal at run time), and anything over unknown.
pub fn broadcast_dim(a: &Dim, b: &Dim) -> Dim {
    match (a, b) {
        _ if a == b => a.clone(),
        (Dim::Fixed(1), other) | (other, Dim::Fixed(1)) => other.clone(),
        (Dim::Fixed(n), _) | (_, Dim::Fixed(n)) => Dim::Fixed(*n),
        (Dim::Symbol(x), Dim::Symbol(y)) => {
            if is_plain_symbol(x) || !is_plain_symbol(y) {
                a.clone()
            } else {
                b.clone()
            }
        }
        (Dim::Symbol(_), Dim::Unknown) => a.clone(),
        (Dim::Unknown, _) => b.clone(),
    }
}

/// NumPy-style broadcast of two shapes (aligned on the right).
pub fn broadcast_shapes(a: &[Dim], b: &[Dim]) -> Vec<Dim> {
    let rank = a.len().max(b.len());
    (0..rank)
        .map(|i| {
            let from_a = (i + a.len()).checked_sub(rank).map(|j| &a[j]);
            let from_b = (i + b.len()).checked_sub(rank).map(|j| &b[j]);
            match (from_a, from_b) {
                (Some(x), Some(y)) => broadcast_dim(x, y),
                (Some(x), None) | (None, Some(x)) => x.clone(),
                (None, None) => Dim::Unknown,
            }
        })
        .collect()
}

/// The first axis where `a` and `b` cannot broadcast: two fixed sizes, neither 1, that differ.
/// Returns the axis counted from the right (`-1` is the last) and the two sizes; symbolic and
/// unknown sizes always fit, since only the run time knows them.
pub fn broadcast_conflict(a: &[Dim], b: &[Dim]) -> Option<(i64, i64, i64)> {
    let shared = a.len().min(b.len());
    (1..=shared).find_map(
        |from_right| match (&a[a.len() - from_right], &b[b.len() - from_right]) {
            (Dim::Fixed(x), Dim::Fixed(y)) if x != y && *x != 1 && *y != 1 => {
                Some((-(from_right as i64), *x, *y))
            }
            _ => None,
        },
    )
}

fn sum_terms(dim: &Dim) -> Vec<String> {
    match dim {
        Dim::Fixed(n) => vec![n.to_string()],
        Dim::Symbol(s) => split_top_level(s, " + ")
            .into_iter()
            .map(str::to_owned)
            .collect(),
        Dim::Unknown => Vec::new(),
    }
}

fn sum_of(terms: Vec<String>) -> Dim {
    let mut constant: i64 = 0;
    let mut symbols = Vec::new();
    for term in terms {
        match term.parse::<i64>() {
            Ok(n) => match constant.checked_add(n) {
                Some(total) => constant = total,
                None => return Dim::Unknown,
            },
            Err(_) => symbols.push(term),
        }
    }
    if symbols.is_empty() {
        return Dim::Fixed(constant);
    }
    symbols.sort();
    if constant != 0 {
        symbols.push(constant.to_string());
    }
    Dim::Symbol(symbols.join(" + "))
}

/// The size `dim` stands for when each plain symbol has the size `sizes` gives it: fixed sizes
/// as they are, and the canonical forms this module builds (sums `a + b + -1`, products
/// `2*a*(b + 1)`, `min(a, b)`, `max(a, b)`) evaluated. `None` for an unknown dimension, a symbol
/// `sizes` lacks, or an overflow.
pub fn evaluate(dim: &Dim, sizes: &std::collections::BTreeMap<String, i64>) -> Option<i64> {
    match dim {
        Dim::Fixed(n) => Some(*n),
        Dim::Unknown => None,
        Dim::Symbol(s) => evaluate_text(s.trim(), sizes),
    }
}

fn evaluate_text(text: &str, sizes: &std::collections::BTreeMap<String, i64>) -> Option<i64> {
    if let Ok(n) = text.parse::<i64>() {
        return Some(n);
    }
    if let Some(size) = sizes.get(text) {
        return Some(*size);
    }
    let terms = split_top_level(text, " + ");
    if terms.len() > 1 {
        return terms.iter().try_fold(0i64, |total, t| {
            total.checked_add(evaluate_text(t.trim(), sizes)?)
        });
    }
    let factors = split_top_level(text, "*");
    if factors.len() > 1 {
        return factors.iter().try_fold(1i64, |total, f| {
            total.checked_mul(evaluate_text(f.trim(), sizes)?)
        });
    }
    if let Some(inner) = text.strip_prefix('(').and_then(|t| t.strip_suffix(')')) {
        return evaluate_text(inner.trim(), sizes);
    }
    for (name, pick) in [
        ("min(", i64::min as fn(i64, i64) -> i64),
        ("max(", i64::max),
    ] {
        if let Some(inner) = text.strip_prefix(name).and_then(|t| t.strip_suffix(')')) {
            let operands = split_top_level(inner, ", ");
            if let [a, b] = operands.as_slice() {
                return Some(pick(
                    evaluate_text(a.trim(), sizes)?,
                    evaluate_text(b.trim(), sizes)?,
                ));
            }
        }
    }
    None
}

/// Splits `text` on `separator` where it is not inside parentheses.
fn split_top_level<'t>(text: &'t str, separator: &str) -> Vec<&'t str> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'(' => depth += 1,
            b')' => depth -= 1,
            _ if depth == 0 && text[i..].starts_with(separator) => {
                parts.push(&text[start..i]);
                i += separator.len();
                start = i;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    parts.push(&text[start..]);
    parts
}

/// A product `coefficient * factor * factor ...` of symbols, used to multiply and divide shapes.
#[derive(Debug, PartialEq)]
struct Monomial {
    coefficient: i64,
    factors: Vec<String>,
}

impl Monomial {
    fn of(dim: &Dim) -> Option<Self> {
        match dim {
            Dim::Fixed(n) => Some(Monomial {
                coefficient: *n,
                factors: Vec::new(),
            }),
            Dim::Symbol(s) => {
                let mut coefficient: i64 = 1;
                let mut factors = Vec::new();
                for factor in split_top_level(s, "*") {
                    match factor.parse::<i64>() {
                        Ok(n) => coefficient = coefficient.checked_mul(n)?,
                        Err(_) if factor.contains(' ') && !factor.starts_with('(') => {
                            factors.push(format!("({factor})"))
                        }
                        Err(_) => factors.push(factor.to_owned()),
                    }
                }
                factors.sort();
                Some(Monomial {
                    coefficient,
                    factors,
                })
            }
            Dim::Unknown => None,
        }
    }

    fn times(&self, other: &Monomial) -> Option<Monomial> {
        let mut factors = self.factors.clone();
        factors.extend(other.factors.iter().cloned());
        factors.sort();
        Some(Monomial {
            coefficient: self.coefficient.checked_mul(other.coefficient)?,
            factors,
        })
    }

    fn divided_by(&self, divisor: &Monomial) -> Option<Monomial> {
        if self.coefficient.checked_rem(divisor.coefficient)? != 0 {
            return None;
        }
        let mut factors = self.factors.clone();
        for factor in &divisor.factors {
            let position = factors.iter().position(|f| f == factor)?;
            factors.remove(position);
        }
        Some(Monomial {
            coefficient: self.coefficient.checked_div(divisor.coefficient)?,
            factors,
        })
    }

    fn into_dim(self) -> Dim {
        if self.factors.is_empty() {
            return Dim::Fixed(self.coefficient);
        }
        if self.coefficient == 1 && self.factors.len() == 1 {
            let factor = &self.factors[0];
            let unwrapped = factor
                .strip_prefix('(')
                .and_then(|f| f.strip_suffix(')'))
                .filter(|inner| split_top_level(inner, " + ").len() > 1);
            return Dim::Symbol(unwrapped.unwrap_or(factor).to_owned());
        }
        let mut parts = Vec::new();
        if self.coefficient != 1 {
            parts.push(self.coefficient.to_string());
        }
        parts.extend(self.factors);
        Dim::Symbol(parts.join("*"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn symbol(s: &str) -> Dim {
        Dim::Symbol(s.to_owned())
    }

    #[test]
    fn canonical_forms_evaluate() {
        let sizes: std::collections::BTreeMap<String, i64> =
            [("batch".to_owned(), 3), ("sequence".to_owned(), 7)].into();
        let batch = symbol("batch");
        let sequence = symbol("sequence");
        let cases = [
            (add(&sequence, &Dim::Fixed(4)), 11),
            (mul(&batch, &add(&sequence, &Dim::Fixed(-1))), 18),
            (mul(&Dim::Fixed(2), &batch), 6),
            (min(&batch, &sequence), 3),
            (max(&batch, &sequence), 7),
        ];
        for (dim, want) in cases {
            assert_eq!(evaluate(&dim, &sizes), Some(want), "{dim:?}");
        }
        assert_eq!(evaluate(&symbol("past"), &sizes), None);
        assert_eq!(evaluate(&Dim::Unknown, &sizes), None);
    }

    #[test]
    fn sums_are_canonical_and_cancel() {
        let total = add(&symbol("sequence"), &symbol("past_sequence"));
        assert_eq!(total, symbol("past_sequence + sequence"));
        assert_eq!(add(&symbol("past_sequence"), &symbol("sequence")), total);
        assert_eq!(sub(&total, &symbol("past_sequence")), symbol("sequence"));
        assert_eq!(add(&Dim::Fixed(2), &Dim::Fixed(3)), Dim::Fixed(5));
        assert_eq!(sub(&symbol("a"), &symbol("b")), Dim::Unknown);
        let last = add(&symbol("s"), &Dim::Fixed(-1));
        assert_eq!(sub(&symbol("s"), &last), Dim::Fixed(1));
    }

    #[test]
    fn products_divide_back() {
        let flat = mul(&symbol("batch"), &symbol("sequence"));
        assert_eq!(flat, symbol("batch*sequence"));
        assert_eq!(div(&flat, &symbol("sequence")), symbol("batch"));
        let scaled = mul(&flat, &Dim::Fixed(32));
        assert_eq!(div(&scaled, &Dim::Fixed(32)), flat);
        assert_eq!(div(&symbol("batch"), &Dim::Fixed(3)), Dim::Unknown);
        let sum = add(&symbol("a"), &symbol("b"));
        assert_eq!(div(&mul(&sum, &Dim::Fixed(4)), &Dim::Fixed(4)), sum);
    }

    #[test]
    fn broadcasting_prefers_fixed_then_plain_symbols() {
        let shape = broadcast_shapes(
            &[symbol("batch"), Dim::Fixed(1), symbol("min(64, sequence)")],
            &[symbol("sequence"), symbol("sequence")],
        );
        assert_eq!(
            shape,
            vec![symbol("batch"), symbol("sequence"), symbol("sequence")]
        );
        assert_eq!(broadcast_dim(&Dim::Fixed(1), &Dim::Unknown), Dim::Unknown);
        assert_eq!(broadcast_dim(&Dim::Fixed(4), &Dim::Unknown), Dim::Fixed(4));
    }

    #[test]
    fn only_differing_fixed_sizes_conflict() {
        let fixed = |dims: &[i64]| dims.iter().map(|&d| Dim::Fixed(d)).collect::<Vec<_>>();
        assert_eq!(
            broadcast_conflict(&fixed(&[2, 3, 4]), &fixed(&[5, 4])),
            Some((-2, 3, 5))
        );
        assert_eq!(
            broadcast_conflict(&fixed(&[2, 1, 4]), &fixed(&[7, 4])),
            None
        );
        assert_eq!(
            broadcast_conflict(
                &[symbol("batch"), Dim::Fixed(8)],
                &[symbol("sequence"), Dim::Unknown]
            ),
            None
        );
        assert_eq!(broadcast_conflict(&[symbol("n")], &fixed(&[3])), None);
    }

    #[test]
    fn extremes_of_symbols() {
        assert_eq!(max(&Dim::Fixed(0), &symbol("s")), symbol("s"));
        assert_eq!(min(&symbol("s"), &Dim::Fixed(64)), symbol("min(64, s)"));
    }
}

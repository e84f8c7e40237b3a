//! Raw-text training data tokenized with a Hugging Face `tokenizer.json` (through the
//! `tokenizers` crate): classification lines, alpaca-shaped instructions and plain documents.
//!
//! - Classification (`--data-format text`): `{"text": "...", "label": 1}`, with an optional
//!   `"text_pair"`; an integer label is a class, any other number a regression target. The pair
//!   is encoded as the tokenizer's post-processor says (`[CLS] A [SEP] B [SEP]` for BERT, with
//!   its token type ids), truncated to `max_len` tokens.
//! - Instructions (`--data-format instruction`): `{"instruction": "...", "input": "...",
//!   "output": "..."}` (`input` may be empty or absent). The prompt is [`instruction_prompt`]; the
//!   response is the output followed by the tokenizer's end-of-sequence token when it has one.
//!   Only response tokens are scored: prompt labels are [`IGNORE_INDEX`].
//! - Documents (`--data-format plain`): one document per line of a `.txt` file, or JSONL
//!   `{"text": "..."}`; every token is scored, and the end-of-sequence token is appended.
//!
//! Instruction examples and documents are cut to their first `max_len` tokens.

use std::path::{Path, PathBuf};

use tokenizers::{Encoding, Tokenizer, TruncationParams};

use super::example::{json_object, label_target, Example, Target, IGNORE_INDEX};
use crate::{Error, Result};

/// Token names taken as the end-of-sequence token when no `tokenizer_config.json` beside the
/// tokenizer names one, in order of preference.
pub const KNOWN_EOS_TOKENS: &[&str] = &[
    "</s>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<eos>",
    "<|eos|>",
    "[EOS]",
];

/// Token names taken as the tokenizer's unknown token, in order of preference.
pub const KNOWN_UNKNOWN_TOKENS: &[&str] = &["[UNK]", "<unk>", "<UNK>", "<|unk|>"];

/// The share of a data file's tokens above which [`TextEncoder::unknown_token_warning`]
/// warns: text the tokenizer does not cover (another script, another language) trains on
/// little more than the unknown token.
pub const UNKNOWN_TOKEN_WARNING_SHARE: f64 = 0.1;

/// The fixed prompt of instruction data: `"Instruction: {instruction}\nInput: {input}\nResponse:\n"`,
/// without the `Input:` line when `input` is empty (blank).
pub fn instruction_prompt(instruction: &str, input: &str) -> String {
    if input.trim().is_empty() {
        format!("Instruction: {instruction}\nResponse:\n")
    } else {
        format!("Instruction: {instruction}\nInput: {input}\nResponse:\n")
    }
}

/// A tokenizer and the length limit that turn text into [`Example`]s.
pub struct TextEncoder {
    tokenizer: Tokenizer,
    truncating: Tokenizer,
    max_len: usize,
    eos: Option<u32>,
    unknown: Option<(u32, &'static str)>,
    path: PathBuf,
}

impl TextEncoder {
    /// Loads a `tokenizer.json` (or the one inside the folder `path`); sequences will have at
    /// most `max_len` tokens (at least 2). The end-of-sequence token is `eos_token` of a
    /// `tokenizer_config.json` beside the file when there is one, otherwise the first of
    /// [`KNOWN_EOS_TOKENS`] in the vocabulary, otherwise none.
    pub fn from_file(path: &Path, max_len: usize) -> Result<Self> {
        if max_len < 2 {
            return Err(Error::Config(format!(
                "--max-len {max_len}: sequences need at least 2 tokens"
            )));
        }
        let file = if path.is_dir() {
            path.join("tokenizer.json")
        } else {
            path.to_path_buf()
        };
        if !file.exists() {
            return Err(Error::Config(format!(
                "{}: no such tokenizer file",
                file.display()
            )));
        }
        let fail = |reason: String| Error::Config(format!("{}: {reason}", file.display()));
        let bytes = crate::input_file::read(&file)?;
        let mut tokenizer = Tokenizer::from_bytes(&bytes)
            .map_err(|e| fail(format!("not a tokenizer the tokenizers library reads: {e}")))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| fail(e.to_string()))?;
        let mut truncating = tokenizer.clone();
        truncating
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(|e| fail(e.to_string()))?;
        let eos = configured_eos(&file)?
            .or_else(|| {
                KNOWN_EOS_TOKENS
                    .iter()
                    .find(|name| tokenizer.token_to_id(name).is_some())
                    .map(|name| (*name).to_owned())
            })
            .map(|name| {
                tokenizer.token_to_id(&name).ok_or_else(|| {
                    fail(format!(
                        "the end-of-sequence token {name:?} is not in the vocabulary"
                    ))
                })
            })
            .transpose()?;
        let unknown = KNOWN_UNKNOWN_TOKENS
            .iter()
            .find_map(|name| Some((tokenizer.token_to_id(name)?, *name)));
        Ok(TextEncoder {
            tokenizer,
            truncating,
            max_len,
            eos,
            unknown,
            path: file,
        })
    }

    /// The tokenizer file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The end-of-sequence token id, when the tokenizer has one.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// A warning when more than [`UNKNOWN_TOKEN_WARNING_SHARE`] of the `input_ids` of
    /// `examples` (read from `data`) are the tokenizer's unknown token (one of
    /// [`KNOWN_UNKNOWN_TOKENS`]).
    pub fn unknown_token_warning(&self, data: &Path, examples: &[Example]) -> Option<String> {
        let (unknown_id, unknown_name) = self.unknown?;
        let ids = examples
            .iter()
            .filter_map(|e| e.sequences.get("input_ids"))
            .flatten();
        let (total, unknown) = ids.fold((0usize, 0usize), |(total, unknown), &id| {
            (
                total + 1,
                unknown + usize::from(id == i64::from(unknown_id)),
            )
        });
        let share = unknown as f64 / total.max(1) as f64;
        (share > UNKNOWN_TOKEN_WARNING_SHARE).then(|| {
            format!(
                "{}: {:.0}% of the tokens ({unknown} of {total}) are the unknown token \
                 {unknown_name} of {}; the tokenizer does not cover this text",
                data.display(),
                share * 100.0,
                self.path.display()
            )
        })
    }

    /// The most tokens an example has.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// A classification (or regression) example: `text` (and `pair`) with the tokenizer's
    /// special tokens and type ids, truncated to `max_len` tokens.
    pub fn classification(
        &self,
        text: &str,
        pair: Option<&str>,
        target: Target,
    ) -> std::result::Result<Example, String> {
        let text = self.enough_of(text);
        let encoding = match pair.map(|pair| self.enough_of(pair)) {
            Some(pair) => self.truncating.encode((text, pair), true),
            None => self.truncating.encode(text, true),
        }
        .map_err(|e| format!("cannot tokenize: {e}"))?;
        let ids = to_i64(encoding.get_ids());
        if ids.is_empty() {
            return Err("the text has no tokens".into());
        }
        Ok(example(ids, to_i64(encoding.get_type_ids()), target))
    }

    /// A causal-LM example from one instruction: the prompt ([`instruction_prompt`]) and the
    /// response (`output`, then end-of-sequence), tokenized separately and joined through the
    /// tokenizer's post-processor; labels are the ids over the response and any special tokens
    /// after it, [`IGNORE_INDEX`] over the prompt and the special tokens before it. Fails when
    /// truncation to `max_len` leaves no response token.
    pub fn instruction(
        &self,
        instruction: &str,
        input: &str,
        output: &str,
    ) -> std::result::Result<Example, String> {
        let prompt = self.encode_plain(self.enough_of(&instruction_prompt(instruction, input)))?;
        let response = self.encode_plain(self.enough_of(output))?;
        let prompt_tokens = prompt.len();
        let joined = self
            .tokenizer
            .post_process(Encoding::merge([prompt, response], true), None, true)
            .map_err(|e| format!("cannot add the special tokens: {e}"))?;
        let mut ids = Vec::with_capacity(joined.len() + 1);
        let mut labels = Vec::with_capacity(joined.len() + 1);
        let mut content_seen = 0;
        for (&id, &special) in joined
            .get_ids()
            .iter()
            .zip(joined.get_special_tokens_mask())
        {
            let in_response = content_seen >= prompt_tokens;
            if special == 0 {
                content_seen += 1;
            }
            ids.push(i64::from(id));
            labels.push(if in_response {
                i64::from(id)
            } else {
                IGNORE_INDEX
            });
        }
        let mut type_ids = to_i64(joined.get_type_ids());
        if let Some(eos) = self.eos.map(i64::from) {
            if ids.last() != Some(&eos) {
                ids.push(eos);
                labels.push(eos);
                type_ids.push(type_ids.last().copied().unwrap_or(0));
            }
        }
        ids.truncate(self.max_len);
        labels.truncate(self.max_len);
        type_ids.truncate(self.max_len);
        if labels.iter().skip(1).all(|&label| label == IGNORE_INDEX) {
            return Err(format!(
                "no response tokens remain: the prompt alone has {} tokens and --max-len is {}",
                prompt_tokens, self.max_len
            ));
        }
        Ok(example(ids, type_ids, Target::Tokens(labels)))
    }

    /// A causal-LM example from one document: its tokens with the tokenizer's special tokens,
    /// then end-of-sequence, cut to `max_len`; every token is a label. Fails below 2 tokens,
    /// which leave nothing to predict.
    pub fn document(&self, text: &str) -> std::result::Result<Example, String> {
        let encoding = self
            .tokenizer
            .encode(self.enough_of(text), true)
            .map_err(|e| format!("cannot tokenize: {e}"))?;
        let mut ids = to_i64(encoding.get_ids());
        let mut type_ids = to_i64(encoding.get_type_ids());
        if let Some(eos) = self.eos.map(i64::from) {
            if ids.last() != Some(&eos) {
                ids.push(eos);
                type_ids.push(0);
            }
        }
        ids.truncate(self.max_len);
        type_ids.truncate(self.max_len);
        if ids.len() < 2 {
            return Err(format!(
                "the text has {} token(s); next-token prediction needs 2",
                ids.len()
            ));
        }
        let labels = ids.clone();
        Ok(example(ids, type_ids, Target::Tokens(labels)))
    }

    /// The shortest prefix of `text` that still has more than `max_len + 1` tokens, cut just
    /// before a whitespace character (or the whole text when it has fewer): every example keeps
    /// at most `max_len` tokens, so tokenizing a long line whole would only spend memory (one
    /// 50 MB line took 9.3 GB) on tokens that are cut away. Tokenizers that split words at
    /// whitespace before anything else (WordPiece, byte-level BPE, SentencePiece's metaspace:
    /// every fixture's) give the prefix exactly the first tokens of the whole text.
    fn enough_of<'t>(&self, text: &'t str) -> &'t str {
        let mut budget = self.max_len.saturating_mul(16).max(256);
        while budget < text.len() {
            let mut end = budget;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            let cut = text[..end]
                .rfind(char::is_whitespace)
                .filter(|&at| at > 0)
                .unwrap_or(end);
            let prefix = &text[..cut];
            if let Ok(encoding) = self.tokenizer.encode(prefix, false) {
                if encoding.len() > self.max_len + 1 {
                    return prefix;
                }
            }
            budget = budget.saturating_mul(4);
        }
        text
    }

    fn encode_plain(&self, text: &str) -> std::result::Result<Encoding, String> {
        self.tokenizer
            .encode(text, false)
            .map_err(|e| format!("cannot tokenize: {e}"))
    }
}

/// Parses a classification line, `{"text": …, "label": …}` with an optional `"text_pair"`.
pub fn parse_classification(
    encoder: &TextEncoder,
    line: &str,
) -> std::result::Result<Example, String> {
    let object = json_object(line)?;
    let text = required_string(&object, "text")?;
    let pair = optional_string(&object, "text_pair")?;
    let label = object.get("label").ok_or("missing \"label\"")?;
    encoder.classification(text, pair, label_target(label)?)
}

/// Parses an instruction line, `{"instruction": …, "input": …, "output": …}` (`input` optional).
pub fn parse_instruction(
    encoder: &TextEncoder,
    line: &str,
) -> std::result::Result<Example, String> {
    let object = json_object(line)?;
    let instruction = required_string(&object, "instruction")?;
    let input = optional_string(&object, "input")?.unwrap_or("");
    let output = object
        .get("output")
        .ok_or("missing \"output\"")?
        .as_str()
        .ok_or("\"output\" must be a string")?;
    encoder.instruction(instruction, input, output)
}

/// Parses a document given as a JSONL line `{"text": …}`.
pub fn parse_document(encoder: &TextEncoder, line: &str) -> std::result::Result<Example, String> {
    let object = json_object(line)?;
    encoder.document(required_string(&object, "text")?)
}

fn required_string<'a>(
    object: &'a serde_json::Map<String, serde_json::Value>,
    key: &str,
) -> std::result::Result<&'a str, String> {
    let text = object
        .get(key)
        .ok_or_else(|| format!("missing \"{key}\""))?
        .as_str()
        .ok_or_else(|| format!("\"{key}\" must be a string"))?;
    if text.trim().is_empty() {
        return Err(format!("\"{key}\" is empty"));
    }
    Ok(text)
}

fn optional_string<'a>(
    object: &'a serde_json::Map<String, serde_json::Value>,
    key: &str,
) -> std::result::Result<Option<&'a str>, String> {
    match object.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(value) => value
            .as_str()
            .map(Some)
            .ok_or_else(|| format!("\"{key}\" must be a string")),
    }
}

/// The `eos_token` of the `tokenizer_config.json` beside `tokenizer_file` (a string or an
/// object with `"content"`), when that file exists and names one.
fn configured_eos(tokenizer_file: &Path) -> Result<Option<String>> {
    let config = tokenizer_file.with_file_name("tokenizer_config.json");
    if !config.is_file() {
        return Ok(None);
    }
    let text = crate::input_file::read_to_string(&config)?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Config(format!("{}: not valid JSON: {e}", config.display())))?;
    let eos = &value["eos_token"];
    Ok(eos
        .as_str()
        .or_else(|| eos["content"].as_str())
        .map(str::to_owned))
}

fn to_i64(ids: &[u32]) -> Vec<i64> {
    ids.iter().map(|&id| i64::from(id)).collect()
}

fn example(ids: Vec<i64>, type_ids: Vec<i64>, target: Target) -> Example {
    let mut sequences = std::collections::BTreeMap::new();
    sequences.insert("attention_mask".to_owned(), vec![1; ids.len()]);
    sequences.insert("token_type_ids".to_owned(), type_ids);
    sequences.insert("input_ids".to_owned(), ids);
    Example {
        sequences,
        features: Default::default(),
        target,
    }
}

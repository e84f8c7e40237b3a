//! `config.json` of a Hugging Face checkpoint, read into what the graph builders need. Every
//! field that is missing, of the wrong type or unsupported is refused with its name.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::builder::Activation;
use super::rope::Rope;
use crate::{Error, Result};

/// What the graph ends in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Head {
    /// The bare model: `last_hidden_state` (and `pooler_output` when the checkpoint has a pooler).
    Base,
    /// Sequence classification: `logits` `[batch, labels]` from the first token.
    SequenceClassification,
    /// Token classification: `logits` `[batch, sequence, labels]`.
    TokenClassification,
    /// Causal language modelling: `logits` `[batch, sequence, vocab]`.
    CausalLm,
}

impl Head {
    /// The head `--head` names.
    pub fn named(name: &str) -> Option<Head> {
        match name {
            "base" => Some(Head::Base),
            "seq-cls" => Some(Head::SequenceClassification),
            "token-cls" => Some(Head::TokenClassification),
            "causal-lm" => Some(Head::CausalLm),
            _ => None,
        }
    }

    /// The head a class in `architectures` implies (`BertForSequenceClassification`).
    fn of_class(class: &str) -> Option<Head> {
        if class.ends_with("ForSequenceClassification") {
            Some(Head::SequenceClassification)
        } else if class.ends_with("ForTokenClassification") {
            Some(Head::TokenClassification)
        } else if class.ends_with("ForCausalLM") {
            Some(Head::CausalLm)
        } else if class.ends_with("Model") {
            Some(Head::Base)
        } else {
            None
        }
    }

    /// The name `--head` takes.
    pub fn name(self) -> &'static str {
        match self {
            Head::Base => "base",
            Head::SequenceClassification => "seq-cls",
            Head::TokenClassification => "token-cls",
            Head::CausalLm => "causal-lm",
        }
    }
}

/// The BERT-like encoders.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncoderKind {
    /// BERT (and MiniLM, which is a BERT).
    Bert,
    /// RoBERTa and XLM-R: positions counted from `pad_token_id + 1`, a two-layer classifier.
    Roberta,
    /// DistilBERT: its own module names, no token types, a `pre_classifier`.
    DistilBert,
}

/// An encoder's configuration.
#[derive(Clone, Debug)]
pub struct EncoderConfig {
    pub kind: EncoderKind,
    pub hidden_size: usize,
    /// The FFN's inner width.
    pub intermediate_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub layer_norm_eps: f32,
    pub activation: Activation,
    /// Rows of the token-type table (1: no `token_type_ids` input).
    pub type_vocab_size: usize,
    pub pad_token_id: i64,
    /// The standard deviation transformers draws new weights with.
    pub initializer_range: f64,
    /// The labels `id2label` (or `num_labels`) names; transformers' default is 2.
    pub num_labels: usize,
}

/// A LLaMA-like decoder's configuration.
#[derive(Clone, Debug)]
pub struct DecoderConfig {
    pub hidden_size: usize,
    /// The FFN's inner width.
    pub intermediate_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub activation: Activation,
    pub rope: Rope,
    /// Keys further back than this are masked (Mistral's sliding window).
    pub sliding_window: Option<usize>,
    /// The LM head reads the token embedding (no `lm_head.weight`).
    pub tie_word_embeddings: bool,
}

/// The architecture of a checkpoint.
#[derive(Clone, Debug)]
pub enum Architecture {
    Encoder(EncoderConfig),
    Decoder(DecoderConfig),
}

/// A parsed `config.json`.
#[derive(Clone, Debug)]
pub struct HfConfig {
    /// `model_type`.
    pub model_type: String,
    /// The first entry of `architectures`, if any.
    pub class: Option<String>,
    pub architecture: Architecture,
}

/// The model types graft imports, for messages.
pub const MODEL_TYPES: &str = "bert, roberta, xlm-roberta, distilbert, llama, mistral, qwen2";

/// Reads and checks `dir/config.json`.
pub fn read(dir: &Path) -> Result<HfConfig> {
    let path = dir.join("config.json");
    let text = crate::input_file::read_to_string(&path)?;
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| Error::Config(format!("{}: not valid JSON: {e}", path.display())))?;
    Fields { path, value }.parse()
}

/// The JSON object with the path to name in messages.
pub(super) struct Fields {
    pub path: PathBuf,
    pub value: Value,
}

impl Fields {
    pub fn error(&self, field: &str, reason: impl std::fmt::Display) -> Error {
        Error::Config(format!(
            "{}: field {field:?}: {reason}",
            self.path.display()
        ))
    }

    pub fn get(&self, field: &str) -> Option<&Value> {
        self.value.get(field).filter(|v| !v.is_null())
    }

    pub fn usize(&self, field: &str) -> Result<usize> {
        let value = self
            .get(field)
            .ok_or_else(|| self.error(field, "missing"))?;
        value
            .as_u64()
            .filter(|&n| n > 0)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| self.error(field, format!("{value} is not a positive integer")))
    }

    pub fn usize_or(&self, field: &str, default: usize) -> Result<usize> {
        match self.get(field) {
            None => Ok(default),
            Some(_) => self.usize(field),
        }
    }

    pub fn f64_or(&self, field: &str, default: f64) -> Result<f64> {
        match self.get(field) {
            None => Ok(default),
            Some(value) => value
                .as_f64()
                .filter(|v| v.is_finite())
                .ok_or_else(|| self.error(field, format!("{value} is not a number"))),
        }
    }

    pub fn i64_or(&self, field: &str, default: i64) -> Result<i64> {
        match self.get(field) {
            None => Ok(default),
            Some(value) => value
                .as_i64()
                .ok_or_else(|| self.error(field, format!("{value} is not an integer"))),
        }
    }

    pub fn bool_or(&self, field: &str, default: bool) -> Result<bool> {
        match self.get(field) {
            None => Ok(default),
            Some(value) => value
                .as_bool()
                .ok_or_else(|| self.error(field, format!("{value} is not true or false"))),
        }
    }

    pub fn str(&self, field: &str) -> Result<Option<&str>> {
        match self.get(field) {
            None => Ok(None),
            Some(value) => value
                .as_str()
                .map(Some)
                .ok_or_else(|| self.error(field, format!("{value} is not a string"))),
        }
    }

    fn activation(&self, field: &str, default: &str) -> Result<Activation> {
        let name = self.str(field)?.unwrap_or(default);
        Activation::named(name).ok_or_else(|| {
            self.error(
                field,
                format!(
                    "activation {name:?} is not supported (graft builds {})",
                    Activation::NAMES
                ),
            )
        })
    }

    fn parse(self) -> Result<HfConfig> {
        let model_type = self
            .str("model_type")?
            .ok_or_else(|| self.error("model_type", "missing"))?
            .to_owned();
        let class = match self.get("architectures") {
            None => None,
            Some(list) => Some(
                list.as_array()
                    .and_then(|l| l.first())
                    .and_then(Value::as_str)
                    .ok_or_else(|| self.error("architectures", "is not a list of class names"))?
                    .to_owned(),
            ),
        };
        let architecture = match model_type.as_str() {
            "bert" | "roberta" | "xlm-roberta" => self.encoder(match model_type.as_str() {
                "bert" => EncoderKind::Bert,
                _ => EncoderKind::Roberta,
            })?,
            "distilbert" => self.distilbert()?,
            "llama" | "mistral" | "qwen2" => self.decoder(&model_type)?,
            other => {
                return Err(self.error(
                    "model_type",
                    format!("{other:?} is not a family graft imports ({MODEL_TYPES})"),
                ))
            }
        };
        Ok(HfConfig {
            model_type,
            class,
            architecture,
        })
    }

    fn encoder(&self, kind: EncoderKind) -> Result<Architecture> {
        let hidden_size = self.usize("hidden_size")?;
        let heads = self.usize("num_attention_heads")?;
        self.divisible("hidden_size", hidden_size, "num_attention_heads", heads)?;
        if let Some(kind) = self.str("position_embedding_type")? {
            if kind != "absolute" {
                return Err(self.error(
                    "position_embedding_type",
                    format!("{kind:?} is not supported (graft builds \"absolute\")"),
                ));
            }
        }
        Ok(Architecture::Encoder(EncoderConfig {
            kind,
            hidden_size,
            intermediate_size: self.usize("intermediate_size")?,
            layers: self.usize("num_hidden_layers")?,
            heads,
            layer_norm_eps: self.f64_or("layer_norm_eps", 1e-12)? as f32,
            activation: self.activation("hidden_act", "gelu")?,
            type_vocab_size: self.usize_or("type_vocab_size", 2)?,
            pad_token_id: self.i64_or("pad_token_id", 0)?,
            initializer_range: self.f64_or("initializer_range", 0.02)?,
            num_labels: self.num_labels()?,
        }))
    }

    fn distilbert(&self) -> Result<Architecture> {
        let hidden_size = self.usize("dim")?;
        let heads = self.usize("n_heads")?;
        self.divisible("dim", hidden_size, "n_heads", heads)?;
        Ok(Architecture::Encoder(EncoderConfig {
            kind: EncoderKind::DistilBert,
            hidden_size,
            intermediate_size: self.usize("hidden_dim")?,
            layers: self.usize("n_layers")?,
            heads,
            layer_norm_eps: 1e-12,
            activation: self.activation("activation", "gelu")?,
            type_vocab_size: 1,
            pad_token_id: self.i64_or("pad_token_id", 0)?,
            initializer_range: self.f64_or("initializer_range", 0.02)?,
            num_labels: self.num_labels()?,
        }))
    }

    fn decoder(&self, model_type: &str) -> Result<Architecture> {
        let hidden_size = self.usize("hidden_size")?;
        let heads = self.usize("num_attention_heads")?;
        let kv_heads = self.usize_or("num_key_value_heads", heads)?;
        if heads % kv_heads != 0 {
            return Err(self.error(
                "num_key_value_heads",
                format!("{kv_heads} does not divide num_attention_heads ({heads})"),
            ));
        }
        let head_dim = match self.get("head_dim") {
            Some(_) => self.usize("head_dim")?,
            None => {
                self.divisible("hidden_size", hidden_size, "num_attention_heads", heads)?;
                hidden_size / heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(self.error("head_dim", format!("{head_dim} is odd; RoPE rotates pairs")));
        }
        if self.usize_or("pretraining_tp", 1)? != 1 {
            return Err(self.error("pretraining_tp", "only 1 is supported"));
        }
        let sliding_window = match model_type {
            // Qwen2 applies its window only when `use_sliding_window` says so.
            "qwen2" if !self.bool_or("use_sliding_window", false)? => None,
            "qwen2" | "mistral" => match self.get("sliding_window") {
                None => None,
                Some(_) => Some(self.usize("sliding_window")?),
            },
            _ => None,
        };
        let max_position_embeddings = self.usize_or("max_position_embeddings", 2048)?;
        Ok(Architecture::Decoder(DecoderConfig {
            hidden_size,
            intermediate_size: self.usize("intermediate_size")?,
            layers: self.usize("num_hidden_layers")?,
            heads,
            kv_heads,
            head_dim,
            rms_norm_eps: self.f64_or("rms_norm_eps", 1e-6)? as f32,
            activation: self.activation("hidden_act", "silu")?,
            rope: Rope::from_config(self, head_dim, max_position_embeddings)?,
            sliding_window,
            tie_word_embeddings: self.bool_or("tie_word_embeddings", false)?,
        }))
    }

    fn num_labels(&self) -> Result<usize> {
        match self.get("id2label").and_then(Value::as_object) {
            Some(labels) if !labels.is_empty() => Ok(labels.len()),
            _ => self.usize_or("num_labels", 2),
        }
    }

    fn divisible(&self, field: &str, value: usize, by_field: &str, by: usize) -> Result<()> {
        if !value.is_multiple_of(by) {
            return Err(self.error(
                field,
                format!("{value} is not a multiple of {by_field} ({by})"),
            ));
        }
        Ok(())
    }
}

impl HfConfig {
    /// The head the checkpoint's class implies, if `architectures` names one graft builds.
    pub fn class_head(&self) -> Option<Head> {
        self.class.as_deref().and_then(Head::of_class)
    }
}

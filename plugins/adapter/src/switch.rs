//! Which adapters compute: a switch per named adapter, and robust AdapterDrop.
//!
//! An adapter's result `v` takes the place of a block value `b` (the sublayer's output, or
//! the block's output) through `Where(keep, v, b)`, so an adapter that is switched off or
//! dropped leaves exactly the base block. `keep` is the adapter's switch — the input
//! `adapter.<name>.active` (`adapter_fusion.<names>.active` for a fusion; bool, default true), which an exported graph reads as an
//! overridable initializer, so a caller turns each named adapter on or off by feeding it —
//! and, with robust AdapterDrop, `layer ≥ n`: in training graphs `n = ⌊u · L⌋` for a fresh
//! seeded draw `u ~ U[0, 1)` per micro-batch over the model's `L` layers (Rücklé et al.,
//! 2021), elsewhere the input `adapter.<name>.dropped_layers` (float, default 0).

use graft_plugin_sdk::{DType, HostInputKind, Init, PatchBuilder};

/// The values that decide whether each of one method's adapters computes.
pub struct Switches {
    prefix: String,
    /// The adapter's switch (bool scalar).
    active: String,
    /// Robust AdapterDrop's number of dropped layers at this step (float scalar).
    dropped: Option<String>,
}

impl Switches {
    /// Declares the switch input `<prefix>.active` (and, when `robust_drop`, robust
    /// AdapterDrop's inputs and draw) of one method's adapters, on a model of `n_layers`
    /// layers.
    pub fn new(
        builder: &mut PatchBuilder<'_>,
        prefix: &str,
        robust_drop: bool,
        n_layers: usize,
    ) -> Switches {
        let prefix = prefix.to_owned();
        let active = builder.host_input(
            &format!("{prefix}.active"),
            HostInputKind::Value,
            DType::Bool,
            vec![],
            Init::Ones,
        );
        let dropped = robust_drop.then(|| {
            let training = builder.host_input(
                &format!("{prefix}.training"),
                HostInputKind::TrainingMode,
                DType::Bool,
                vec![],
                Init::Zeros,
            );
            let draw = builder.host_input(
                &format!("{prefix}.drop_draw"),
                HostInputKind::Uniform,
                DType::Float,
                vec![],
                Init::Zeros,
            );
            let chosen = builder.host_input(
                &format!("{prefix}.dropped_layers"),
                HostInputKind::Value,
                DType::Float,
                vec![],
                Init::Zeros,
            );
            let layers = builder.constant_scalar(
                &format!("{prefix}.n_layers"),
                n_layers as f64,
                DType::Float,
            );
            let scaled = builder.op(
                &format!("{prefix}.drop_scaled"),
                "Mul",
                &[&draw, &layers],
                &[],
            );
            let drawn = builder.op(&format!("{prefix}.drop_drawn"), "Floor", &[&scaled], &[]);
            builder.op(
                &format!("{prefix}.dropped"),
                "Where",
                &[&training, &drawn, &chosen],
                &[],
            )
        });
        Switches {
            prefix,
            active,
            dropped,
        }
    }

    /// The bool scalar that says whether the adapters of `layer` (counted across stacks)
    /// compute.
    pub fn keep(&self, builder: &mut PatchBuilder<'_>, layer: usize) -> String {
        let Some(dropped) = &self.dropped else {
            return self.active.clone();
        };
        // `layer ≥ n` as `n < layer + ½`: n is a whole number held in a float.
        let bound = builder.constant_scalar(
            &format!("{}.layer_{layer}_bound", self.prefix),
            layer as f64 + 0.5,
            DType::Float,
        );
        let reached = builder.op(
            &format!("{}.layer_{layer}_kept", self.prefix),
            "Less",
            &[dropped, &bound],
            &[],
        );
        builder.op(
            &format!("{}.layer_{layer}_keep", self.prefix),
            "And",
            &[&self.active, &reached],
            &[],
        )
    }
}

/// `Where(keep, adapted, base)`: the adapter's value where it computes, else the base one.
pub fn select(
    builder: &mut PatchBuilder<'_>,
    stem: &str,
    keep: &str,
    adapted: &str,
    base: &str,
) -> String {
    builder.op(
        &format!("{stem}.switch"),
        "Where",
        &[keep, adapted, base],
        &[],
    )
}

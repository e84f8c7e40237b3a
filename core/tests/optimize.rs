//! Graph optimizations keep every output: `narrow_unread_rows` on every fixture gives the
//! outputs ONNX Runtime computes for the unchanged model, and it narrows the models whose head
//! reads one token (BERT's pooler, ViT's class token).

mod common;

use common::*;

#[test]
fn narrowing_unread_rows_keeps_every_fixture_output() {
    let mut narrowed_fixtures = Vec::new();
    for fixture in FIXTURES {
        let base = graft::onnx::load(&fixture_model(fixture)).unwrap();
        let mut narrowed = base.clone();
        let count = graft::optimize::narrow_unread_rows(&mut narrowed).unwrap();
        narrowed.graph.validate().unwrap();
        if count == 0 {
            continue;
        }
        println!("{fixture}: {count} nodes narrowed");
        narrowed_fixtures.push(*fixture);
        let inputs = fixture_inputs(fixture);
        let expected = run_model(&base, &inputs);
        let got = run_model(&narrowed, &inputs);
        let diff = max_diff(&expected, &got);
        assert!(
            diff <= 1e-5,
            "{fixture}: {count} nodes narrowed, outputs differ by {diff}"
        );
        assert!(
            narrowed.graph.nodes.len() < base.graph.nodes.len() + 40,
            "{fixture}: the narrowing added {} nodes",
            narrowed.graph.nodes.len() - base.graph.nodes.len()
        );
    }
    for expected in ["bert-legacy", "vit-legacy"] {
        assert!(
            narrowed_fixtures.contains(&expected),
            "{expected} was not narrowed (narrowed: {narrowed_fixtures:?})"
        );
    }
}

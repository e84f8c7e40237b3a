//! Temporary: prints what graft's readers say about files (not committed).
fn main() {
    for arg in std::env::args().skip(1) {
        let path = std::path::Path::new(&arg);
        match graft::runtime::read_npz(path) {
            Ok(a) => println!("{arg}: ok, {} arrays", a.len()),
            Err(e) => println!("{arg}: {e:?} / {e}"),
        }
    }
}

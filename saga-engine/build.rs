// Migrations are embedded by `sqlx::migrate!`; without this line a new migration
// file would not trigger a rebuild and would be silently left out.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}

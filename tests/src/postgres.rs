//! A PostgreSQL database of a test's own: created on the server the suite
//! uses, dropped when the test ends. The server is a requirement, not an
//! option: without it the test fails and says how to start one.

/// The server's maintenance database; `STEPBOX_TEST_POSTGRES` overrides it.
const DEFAULT_SERVER: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A database created for one test.
pub struct TestDatabase {
    /// Its URL, for `--db` or `PgStore::open`.
    pub url: String,
    name: String,
    server: String,
}

impl TestDatabase {
    /// Creates a database with a fresh name.
    ///
    /// # Panics
    ///
    /// When the server cannot be reached, with how to start one.
    pub fn create() -> Self {
        let server = std::env::var("STEPBOX_TEST_POSTGRES").unwrap_or_else(|_| DEFAULT_SERVER.to_owned());
        let name = format!("stepbox_test_{}_{}", std::process::id(), unique());
        // Ordered by a locale that does not sort by bytes, where the server
        // has one (PostgreSQL 15 with ICU): stepbox must not depend on it.
        let icu = format!(
            "CREATE DATABASE {name} TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
        );
        if try_admin(&server, &icu).is_err() {
            admin(&server, &format!("CREATE DATABASE {name}"));
        }
        let url = match server.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => panic!("STEPBOX_TEST_POSTGRES must be a postgres:// URL ending in a database name"),
        };
        TestDatabase { url, name, server }
    }
}

impl TestDatabase {
    /// The rows `query` gives, each column as text (`None` for NULL).
    ///
    /// # Panics
    ///
    /// When the query fails.
    pub fn query(&self, query: &str) -> Vec<Vec<Option<String>>> {
        let (url, query) = (self.url.clone(), query.to_owned());
        std::thread::spawn(move || {
            let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
            let messages = client.simple_query(&query).unwrap_or_else(|err| panic!("{query}: {err}"));
            messages
                .into_iter()
                .filter_map(|message| match message {
                    postgres::SimpleQueryMessage::Row(row) => {
                        Some((0..row.len()).map(|i| row.get(i).map(str::to_owned)).collect())
                    }
                    _ => None,
                })
                .collect()
        })
        .join()
        .unwrap()
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        admin(&self.server, &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
    }
}

/// A number no other database of this process has.
fn unique() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    u64::from(nanos) * 1000 + NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Runs one statement on the maintenance database.
fn admin(server: &str, statement: &str) {
    try_admin(server, statement).unwrap_or_else(|err| panic!("{statement}: {err}"));
}

/// Runs one statement on the maintenance database, on a thread of its own
/// (the client blocks, which async tests must not do on theirs); what the
/// server said if it refused it.
fn try_admin(server: &str, statement: &str) -> Result<(), postgres::Error> {
    let (server, statement) = (server.to_owned(), statement.to_owned());
    std::thread::spawn(move || {
        let mut client = postgres::Client::connect(&server, postgres::NoTls).unwrap_or_else(|err| {
            panic!(
                "cannot reach PostgreSQL at {server} ({err}); the test suite needs it. Start it \
                 (`sudo service postgresql start`, or `docker run -d -p 5432:5432 -e POSTGRES_HOST_AUTH_METHOD=trust \
                 postgres:16`), or point STEPBOX_TEST_POSTGRES at a server where this user may create databases"
            )
        });
        client.batch_execute(&statement)
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

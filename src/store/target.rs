//! What `--db` names: a SQLite file (the embedded default) or a PostgreSQL database.

use std::fmt;
use std::path::{Path, PathBuf};

/// Where the record lives.
#[derive(Clone, PartialEq, Eq)]
pub enum Db {
    /// A SQLite database file.
    File(PathBuf),
    /// A PostgreSQL database, by its `postgres://` or `postgresql://` URL.
    Postgres(PgUrl),
}

/// A PostgreSQL connection URL. It may hold a password: it is shown, logged and
/// stored only with the password replaced by `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct PgUrl {
    url: url::Url,
}

impl PgUrl {
    /// The whole URL, password included: for the driver only.
    pub(crate) fn secret(&self) -> &url::Url {
        &self.url
    }

    /// The URL as it may be shown: the password replaced by `***`.
    pub fn shown(&self) -> String {
        let mut shown = self.url.clone();
        if shown.password().is_some() {
            let _ = shown.set_password(Some("***"));
        }
        // A password given as a query parameter is hidden too.
        let pairs: Vec<(String, String)> = shown
            .query_pairs()
            .map(|(k, v)| {
                let v = if k.eq_ignore_ascii_case("password") {
                    "***".to_owned()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        if !pairs.is_empty() {
            shown.query_pairs_mut().clear().extend_pairs(pairs);
        }
        shown.to_string()
    }
}

impl Db {
    /// Reads `--db`: a `postgres://` or `postgresql://` URL, else a file path.
    pub fn parse(text: &str) -> Result<Db, String> {
        let lower = text.get(..13).unwrap_or(text).to_ascii_lowercase();
        if !(lower.starts_with("postgres://") || lower.starts_with("postgresql://")) {
            if text.is_empty() {
                return Err("give a database file path or a postgres:// URL".to_owned());
            }
            return Ok(Db::File(PathBuf::from(text)));
        }
        let url = url::Url::parse(text).map_err(|e| {
            format!(
                "not a valid PostgreSQL URL ({e}): write it as \
                 postgres://USER@HOST:PORT/DATABASE?sslmode=require"
            )
        })?;
        if url.host_str().is_none_or(str::is_empty) {
            return Err(
                "the PostgreSQL URL names no host: write it as postgres://USER@HOST/DATABASE"
                    .to_owned(),
            );
        }
        Ok(Db::Postgres(PgUrl { url }))
    }

    /// The file, for a SQLite database.
    pub fn file(&self) -> Option<&Path> {
        match self {
            Db::File(path) => Some(path),
            Db::Postgres(_) => None,
        }
    }

    /// The database as it may be shown in messages, logs and reports.
    pub fn shown(&self) -> String {
        match self {
            Db::File(path) => path.display().to_string(),
            Db::Postgres(url) => url.shown(),
        }
    }
}

impl std::str::FromStr for Db {
    type Err = String;

    fn from_str(text: &str) -> Result<Db, String> {
        Db::parse(text)
    }
}

impl From<PathBuf> for Db {
    fn from(path: PathBuf) -> Db {
        Db::File(path)
    }
}

impl From<&Path> for Db {
    fn from(path: &Path) -> Db {
        Db::File(path.to_owned())
    }
}

impl fmt::Debug for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PgUrl({})", self.shown())
    }
}

impl fmt::Display for Db {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown())
    }
}

impl fmt::Debug for Db {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Db({})", self.shown())
    }
}

impl serde::Serialize for Db {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.shown())
    }
}

impl<'de> serde::Deserialize<'de> for Db {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Db, D::Error> {
        let text = String::deserialize(d)?;
        Db::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_postgres_and_anything_else_a_file() {
        assert_eq!(Db::parse("shop.db").unwrap(), Db::File("shop.db".into()));
        assert_eq!(
            Db::parse("/var/lib/x/postgres.db").unwrap().file(),
            Some(Path::new("/var/lib/x/postgres.db"))
        );
        for url in [
            "postgres://kb@db.internal/shop",
            "postgresql://kb@10.0.0.5:5433/shop?sslmode=require",
            "POSTGRES://kb@h/shop",
        ] {
            assert!(matches!(Db::parse(url), Ok(Db::Postgres(_))), "{url}");
        }
        assert!(Db::parse("postgres:///shop").is_err());
        assert!(Db::parse("postgres://kb@[::1/x").is_err());
        assert!(Db::parse("").is_err());
    }

    #[test]
    fn a_password_is_never_shown() {
        let db =
            Db::parse("postgres://kb:s3cret@h:5432/shop?password=other&sslmode=require").unwrap();
        for text in [
            db.to_string(),
            format!("{db:?}"),
            serde_json::to_string(&db).unwrap(),
        ] {
            assert!(
                !text.contains("s3cret") && !text.contains("other"),
                "{text}"
            );
            assert!(text.contains("sslmode=require"), "{text}");
        }
        let Db::Postgres(url) = db else { panic!() };
        assert_eq!(url.secret().password(), Some("s3cret"));
    }
}

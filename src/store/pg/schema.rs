//! The schema on PostgreSQL: the checks before a store opens (ours, or empty; not
//! another application's; not newer), and its creation in `kohort_batch` or the
//! schema the URL names.

use super::lock;
use crate::store::Access;
use crate::store::failure::{DbCause, Failure};

/// The schema version this build writes (`schema.sql`).
const VERSION: i64 = 1;

/// Checks the schema of the connection's search path and, to write, makes its
/// tables (one process at a time: a transaction-level advisory lock). Where the URL
/// names no schema, a new record is refused if this database already holds one in
/// another schema (the URL would otherwise quietly start an empty record).
pub(super) async fn prepare(
    client: &mut deadpool_postgres::Client,
    access: Access,
    schema_named: bool,
) -> Result<(), Failure> {
    let schema: Option<String> = client
        .query_one("SELECT current_schema()", &[])
        .await?
        .try_get(0)?;
    let schema = match schema {
        Some(schema) => schema,
        None => create_schema(client, access).await?,
    };
    let tx = client.transaction().await?;
    if access == Access::Write {
        tx.execute("SELECT pg_advisory_xact_lock($1, 0)", &[&lock::KBAT])
            .await?;
    }
    // From the catalog, which lists every table whatever this role may do with it
    // (information_schema shows only tables the role has a privilege on).
    let tables: Vec<String> = tx
        .query(
            "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p', 'v', 'm', 'f')",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
    if tables.iter().any(|t| t == "kohort_batch_schema") {
        check_version(&tx).await?;
    } else {
        refuse_foreign(&schema, &tables, access)?;
        if !schema_named {
            refuse_elsewhere(&tx, &schema).await?;
        }
        tx.batch_execute(include_str!("schema.sql")).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Makes the schema the search path names first, which does not exist yet (only
/// to write: reading makes nothing). Returns its name.
async fn create_schema(
    client: &deadpool_postgres::Client,
    access: Access,
) -> Result<String, Failure> {
    let wanted: String = client
        .query_one("SHOW search_path", &[])
        .await?
        .try_get(0)?;
    if access == Access::Read {
        return Err(Failure::new(
            DbCause::Empty,
            format!(
                "no schema of the search path ({wanted}) exists: no run has used this \
                 database yet (is --db the URL your runs use?)"
            ),
        ));
    }
    // The first entry as PostgreSQL reads it (case folded unless quoted).
    let first: Option<String> = match client
        .query_one(
            "SELECT (parse_ident(trim(split_part($1, ',', 1))))[1]",
            &[&wanted],
        )
        .await
    {
        Ok(row) => row.try_get(0)?,
        // Not a name PostgreSQL can read: said below, with what to do.
        Err(e)
            if e.code() == Some(&tokio_postgres::error::SqlState::INVALID_PARAMETER_VALUE)
                || e.code() == Some(&tokio_postgres::error::SqlState::INVALID_NAME) =>
        {
            None
        }
        Err(e) => return Err(e.into()),
    };
    let unusable = || {
        Failure::new(
            DbCause::NotOurs,
            format!(
                "no schema of the search path ({wanted}) exists, and its first entry is not \
                 one kohort-batch can make: name one with ?options=-csearch_path%3DNAME"
            ),
        )
    };
    let name = first
        .filter(|n| !n.is_empty() && !n.starts_with('$'))
        .ok_or_else(unusable)?;
    client
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {}",
            quote_ident(&name)
        ))
        .await?;
    let now: Option<String> = client
        .query_one("SELECT current_schema()", &[])
        .await?
        .try_get(0)?;
    now.ok_or_else(unusable)
}

/// Refuses to start a record in `schema` when another schema of this database
/// holds one.
async fn refuse_elsewhere(
    tx: &deadpool_postgres::Transaction<'_>,
    schema: &str,
) -> Result<(), Failure> {
    let other: Option<String> = tx
        .query_opt(
            "SELECT n.nspname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relname = 'kohort_batch_schema' AND n.nspname <> current_schema() LIMIT 1",
            &[],
        )
        .await?
        .map(|r| r.try_get(0))
        .transpose()?;
    match other {
        None => Ok(()),
        Some(other) => Err(Failure::new(
            DbCause::NotOurs,
            format!(
                "this database holds a kohort-batch record in schema {other}, and this URL \
                 would start a new one in schema {schema}; nothing was changed. Name the \
                 schema of your runs with ?options=-csearch_path%3D{other} (or another on \
                 purpose, for a second record)"
            ),
        )),
    }
}

/// A schema without our mark: refused if it holds a table named as one of ours
/// (another application's), or if the command only reads.
fn refuse_foreign(schema: &str, tables: &[String], access: Access) -> Result<(), Failure> {
    let taken: Vec<&str> = tables
        .iter()
        .map(String::as_str)
        .filter(|t| OUR_TABLES.contains(t))
        .collect();
    if !taken.is_empty() {
        return Err(Failure::new(
            DbCause::NotOurs,
            format!(
                "schema {schema} holds tables of another application ({}); nothing in it \
                 was changed. Give kohort-batch a schema of its own with \
                 ?options=-csearch_path%3Dkohort_batch",
                taken.join(", ")
            ),
        ));
    }
    if access == Access::Read {
        return Err(Failure::new(
            DbCause::Empty,
            format!(
                "schema {schema} holds no kohort-batch tables: no run has used it yet \
                 (is --db the URL your runs use?)"
            ),
        ));
    }
    Ok(())
}

/// Refuses a schema written by a newer kohort-batch.
async fn check_version(tx: &deadpool_postgres::Transaction<'_>) -> Result<(), Failure> {
    let version: i64 = tx
        .query_one("SELECT max(version) FROM kohort_batch_schema", &[])
        .await?
        .try_get::<_, Option<i64>>(0)?
        .unwrap_or(0);
    if version > VERSION {
        return Err(crate::store::schema::newer(version, VERSION));
    }
    Ok(())
}

/// The tables `schema.sql` makes.
const OUR_TABLES: [&str; 9] = [
    "kohort_batch_schema",
    "runs",
    "sources",
    "jobs",
    "attempts",
    "groups",
    "import_issues",
    "lock",
    "inbox",
];

/// A name as an SQL identifier, quoted.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

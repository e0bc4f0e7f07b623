-- kohort-batch on PostgreSQL: its schema and three roles, each with only what it needs.
-- See deploy/README.md, "PostgreSQL". Run it as a superuser, connected to the
-- database that holds the record, twice:
--
--   psql -v ON_ERROR_STOP=1 -d shop -f deploy/postgres-roles.sql   # roles and schema
--   kohort-batch init                      # as kb_owner: makes the tables
--   psql -v ON_ERROR_STOP=1 -d shop -f deploy/postgres-roles.sql   # grants on the tables
--
-- Running it again changes nothing. It sets no passwords: give them with psql's
-- \password ROLE. No role needs a privilege on the sequences behind the identity
-- columns (checked on PostgreSQL 15).
--
--   kb_owner     owns the schema and its tables; runs `kohort-batch init` only
--   kb_worker    runs every other command: run, retry-failed, enqueue, report, export
--   kb_producer  inserts into the inbox, and nothing else

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'kb_owner') THEN
        CREATE ROLE kb_owner LOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'kb_worker') THEN
        CREATE ROLE kb_worker LOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'kb_producer') THEN
        CREATE ROLE kb_producer LOGIN;
    END IF;
    -- Needed only where CONNECT was revoked from PUBLIC.
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO kb_owner, kb_worker, kb_producer',
                   current_database());
END
$$;

CREATE SCHEMA IF NOT EXISTS kohort_batch AUTHORIZATION kb_owner;
-- USAGE lets a role see the schema's tables; CREATE stays with the owner.
GRANT USAGE ON SCHEMA kohort_batch TO kb_worker, kb_producer;

SELECT to_regclass('kohort_batch.kohort_batch_schema') IS NOT NULL AS kb_tables \gset
\if :kb_tables
-- The worker: no table is dropped, altered or truncated, and jobs, runs and the
-- record of requests are never deleted.
GRANT SELECT ON kohort_batch.kohort_batch_schema TO kb_worker;
GRANT SELECT, INSERT, UPDATE ON kohort_batch.runs, kohort_batch.jobs TO kb_worker;
GRANT SELECT, INSERT ON kohort_batch.sources, kohort_batch.attempts, kohort_batch.groups,
    kohort_batch.import_issues TO kb_worker;
GRANT SELECT, INSERT, DELETE ON kohort_batch.lock TO kb_worker;
-- A run locks the inbox rows it moves (SELECT … FOR UPDATE needs UPDATE), then
-- deletes them.
GRANT SELECT, UPDATE, DELETE ON kohort_batch.inbox TO kb_worker;

-- The producer: INSERT into the inbox only. (INSERT … RETURNING id would also need
-- GRANT SELECT (id) ON kohort_batch.inbox TO kb_producer.)
GRANT INSERT ON kohort_batch.inbox TO kb_producer;
\else
\echo 'No kohort-batch tables yet: run `kohort-batch init` as kb_owner, then this script again.'
\endif

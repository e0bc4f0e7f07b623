//! Every call of [`Backend`] on PostgreSQL: each takes a pooled connection and the
//! room that holds its SQL.

use super::record::{Commit, numbered, record};
use super::{Postgres, import, lock, reads};
use crate::error::Result;
use crate::job::RowFields;
use crate::source::ImportRow;
use crate::store::reads::{JobExport, RunFacts, RunListEntry, SendPlan};
use crate::store::{
    Attempt, Backend, ImportCounts, Job, JobState, RetryFilter, StateCounts, Transition,
};

#[async_trait::async_trait]
impl Backend for Postgres {
    async fn send_plan(&self, precheck_always: bool) -> Result<SendPlan> {
        let client = self.client().await?;
        reads::send_plan(&client, precheck_always)
            .await
            .map_err(|f| self.error(f))
    }

    async fn begin_run(&self, command: &str, options: String, exclusive: bool) -> Result<i64> {
        let mut held = None;
        if exclusive {
            held = Some(
                lock::RunLock::acquire(&self.connector, &self.shown, self.lock_lost.clone())
                    .await?,
            );
        }
        let command = command.to_owned();
        let backend = held.as_ref().map_or(0, lock::RunLock::backend_pid);
        let run_id = self
            .in_tx(move |tx| {
                Box::pin(async move {
                    lock::begin_run(tx, &command, &options, exclusive, backend).await
                })
            })
            .await?;
        *self.lock.lock().await = held;
        Ok(run_id)
    }

    async fn finish_run(
        &self,
        run_id: i64,
        exit_code: u8,
        stopped: Option<String>,
        paused: std::time::Duration,
    ) -> Result<String> {
        let paused_ms = i64::try_from(paused.as_millis()).unwrap_or(i64::MAX);
        let result = self
            .in_tx(move |tx| {
                Box::pin(async move {
                    let finished_at = crate::store::clock::now_text();
                    tx.execute(
                        "UPDATE runs SET finished_at = $1, exit_code = $2, stopped = $3, \
                         paused_ms = $4 WHERE id = $5",
                        &[
                            &finished_at,
                            &i64::from(exit_code),
                            &stopped,
                            &paused_ms,
                            &run_id,
                        ],
                    )
                    .await?;
                    tx.execute("DELETE FROM lock WHERE run_id = $1", &[&run_id])
                        .await?;
                    Ok(finished_at)
                })
            })
            .await;
        if let Some(held) = self.lock.lock().await.take() {
            held.release().await;
        }
        result
    }

    async fn import(
        &self,
        run_id: i64,
        source: String,
        rows: Vec<ImportRow>,
    ) -> Result<(ImportCounts, Vec<ImportRow>)> {
        let mut client = self.client().await?;
        let counts = import::import_batch(&mut client, run_id, &source, &rows)
            .await
            .map_err(|f| self.error(f))?;
        Ok((counts, rows))
    }

    /// Larger than SQLite's: each batch is a round trip of statements around its
    /// `COPY`, and a commit waiting for the disk.
    fn import_batch_rows(&self) -> usize {
        10_000
    }

    async fn groups_without_share_id(&self) -> Result<i64> {
        let client = self.client().await?;
        reads::groups_without_share_id(&client)
            .await
            .map_err(|f| self.error(f))
    }

    async fn add_import_counts(&self, run_id: i64, counts: ImportCounts) -> Result<()> {
        self.in_tx(move |tx| Box::pin(import::add_import_counts(tx, run_id, counts)))
            .await
    }

    async fn requeue_unknown(&self, run_id: i64) -> Result<usize> {
        let client = self.client().await?;
        let n = client
            .execute(&numbered(crate::store::queue::REQUEUE_UNKNOWN), &[&run_id])
            .await
            .map_err(|e| self.error(e.into()))?;
        Ok(n as usize)
    }

    async fn inbox_last(&self) -> Result<Option<i64>> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT max(id) FROM inbox", &[])
            .await
            .map_err(|e| self.error(e.into()))?;
        row.try_get(0).map_err(|e| self.error(e.into()))
    }

    async fn inbox_page(
        &self,
        after: i64,
        last: i64,
        limit: usize,
    ) -> Result<Vec<(i64, RowFields)>> {
        let client = self.client().await?;
        reads::inbox_page(&client, after, last, limit)
            .await
            .map_err(|f| self.error(f))
    }

    async fn import_inbox(
        &self,
        run_id: i64,
        rows: Vec<ImportRow>,
        _through: i64,
    ) -> Result<ImportCounts> {
        let mut client = self.client().await?;
        import::import_inbox(&mut client, run_id, rows)
            .await
            .map_err(|f| self.error(f))
    }

    async fn requeue_failed(&self, run_id: i64, filter: RetryFilter) -> Result<usize> {
        let client = self.client().await?;
        reads::requeue_failed(&client, run_id, &filter)
            .await
            .map_err(|f| self.error(f))
    }

    async fn jobs_page(
        &self,
        states: &'static [JobState],
        after_id: i64,
        limit: usize,
    ) -> Result<Vec<JobExport>> {
        let client = self.client().await?;
        reads::jobs_page(&client, Some(states), after_id, limit)
            .await
            .map_err(|f| self.error(f))
    }

    async fn conflicts_page(&self, after_id: i64, limit: usize) -> Result<Vec<JobExport>> {
        let client = self.client().await?;
        reads::conflicts_page(&client, after_id, limit)
            .await
            .map_err(|f| self.error(f))
    }

    async fn claim_pending(&self, run_id: i64, after_id: i64, limit: usize) -> Result<Vec<Job>> {
        let client = self.client().await?;
        reads::claim_pending(&client, run_id, after_id, limit)
            .await
            .map_err(|f| self.error(f))
    }

    async fn record(
        &self,
        run_id: i64,
        job_id: i64,
        attempt: Option<Attempt>,
        transition: Transition,
    ) -> Result<bool> {
        self.healthy()?;
        record(
            &self.pool,
            Commit::Durable,
            run_id,
            job_id,
            attempt.as_ref(),
            &transition,
        )
        .await
        .map_err(|f| self.error(f))
    }

    async fn run_facts(&self, run_id: i64) -> Result<Option<RunFacts>> {
        let client = self.client().await?;
        reads::run_facts(&client, run_id)
            .await
            .map_err(|f| self.error(f))
    }

    async fn last_success(&self) -> Result<Option<f64>> {
        let client = self.client().await?;
        let at: Option<String> = client
            .query_one("SELECT max(finished_at) FROM runs WHERE exit_code = 0", &[])
            .await
            .map_err(|e| self.error(e.into()))?
            .try_get(0)
            .map_err(|e| self.error(e.into()))?;
        Ok(crate::store::clock::unix_seconds(at.as_deref()))
    }

    async fn last_run_id(&self) -> Result<Option<i64>> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT max(id) FROM runs", &[])
            .await
            .map_err(|e| self.error(e.into()))?;
        row.try_get(0).map_err(|e| self.error(e.into()))
    }

    async fn save_report(&self, run_id: i64, json: String) -> Result<()> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE runs SET report = $1 WHERE id = $2",
                &[&json, &run_id],
            )
            .await
            .map_err(|e| self.error(e.into()))?;
        Ok(())
    }

    async fn saved_report(&self, run_id: i64) -> Result<Option<String>> {
        let client = self.client().await?;
        let row = client
            .query_opt("SELECT report FROM runs WHERE id = $1", &[&run_id])
            .await
            .map_err(|e| self.error(e.into()))?;
        let report = row.map(|r| r.try_get::<_, Option<String>>(0)).transpose();
        Ok(report.map_err(|e| self.error(e.into()))?.flatten())
    }

    async fn list_runs(&self, limit: usize) -> Result<Vec<RunListEntry>> {
        let client = self.client().await?;
        reads::list_runs(&client, limit)
            .await
            .map_err(|f| self.error(f))
    }

    async fn state_counts(&self) -> Result<StateCounts> {
        let client = self.client().await?;
        reads::state_counts(&client)
            .await
            .map_err(|f| self.error(f))
    }

    async fn jobs(&self) -> Result<Vec<JobExport>> {
        let client = self.client().await?;
        reads::jobs_page(&client, None, 0, usize::MAX)
            .await
            .map_err(|f| self.error(f))
    }

    fn record_last(
        &self,
        run_id: i64,
        job_id: i64,
        attempt: Option<Attempt>,
        transition: Transition,
    ) -> Result<()> {
        self.healthy()?;
        let pool = self.pool.clone();
        let pending = self.pending.clone();
        pending.count.send_modify(|n| *n += 1);
        tokio::spawn(async move {
            let result = record(
                &pool,
                Commit::Soon,
                run_id,
                job_id,
                attempt.as_ref(),
                &transition,
            )
            .await;
            if let Err(f) = result {
                let mut first = pending.failure.lock().unwrap_or_else(|e| e.into_inner());
                first.get_or_insert(f);
            }
            pending.count.send_modify(|n| *n -= 1);
        });
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        let mut count = self.pending.count.subscribe();
        // The sender lives in `self`: waiting cannot fail.
        let _ = count.wait_for(|n| *n == 0).await;
        self.healthy()
    }

    fn checkpoint_soon(&self) {}

    async fn close(&self) {
        let _ = self.flush().await;
        if let Some(held) = self.lock.lock().await.take() {
            held.release().await;
        }
        self.pool.close();
    }
}

//! Users, API keys and bearer tokens. A write that revokes credentials
//! notes it once committed, so this process's credential caches forget.

use chrono::{DateTime, FixedOffset, Utc};

use super::{PostgresStore, local};
use crate::store::{ApiKeyRecord, Role, StoreError, UserRecord, note_revocation};

impl PostgresStore {
    pub(super) async fn put_user_pg(&self, user: UserRecord) -> Result<(), StoreError> {
        let grants = serde_json::to_string(&user.grants).unwrap_or_else(|_| "[]".into());
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        tx.execute(
            "INSERT INTO users (name, password_hash, primary_instance, grants) VALUES ($1, $2, $3, $4)
             ON CONFLICT (name) DO UPDATE SET password_hash = excluded.password_hash,
               primary_instance = excluded.primary_instance, grants = excluded.grants",
            &[&user.name, &user.password_hash, &user.primary_instance, &grants],
        )
        .await?;
        tx.execute("DELETE FROM tokens WHERE user_name = $1", &[&user.name])
            .await?;
        tx.commit().await?;
        note_revocation();
        Ok(())
    }

    pub(super) async fn set_password_pg(
        &self,
        name: &str,
        password_hash: &str,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        let found = tx
            .execute(
                "UPDATE users SET password_hash = $2 WHERE name = $1",
                &[&name, &password_hash],
            )
            .await?
            > 0;
        tx.execute("DELETE FROM tokens WHERE user_name = $1", &[&name])
            .await?;
        tx.commit().await?;
        note_revocation();
        Ok(found)
    }

    pub(super) async fn user_pg(&self, name: &str) -> Result<Option<UserRecord>, StoreError> {
        let conn = self.conn().await?;
        let row = conn
            .query_opt(
                "SELECT name, password_hash, primary_instance, grants FROM users WHERE name = $1",
                &[&name],
            )
            .await?;
        Ok(row.map(|r| UserRecord {
            name: r.get(0),
            password_hash: r.get(1),
            primary_instance: r.get(2),
            grants: serde_json::from_str::<Vec<(String, Role)>>(r.get(3)).unwrap_or_default(),
        }))
    }

    pub(super) async fn has_users_pg(&self) -> Result<bool, StoreError> {
        let conn = self.conn().await?;
        Ok(conn
            .query_one("SELECT EXISTS (SELECT 1 FROM users)", &[])
            .await?
            .get(0))
    }

    pub(super) async fn put_api_key_pg(
        &self,
        key_hash: &str,
        user: &str,
        label: &str,
    ) -> Result<(), StoreError> {
        let conn = self.conn().await?;
        conn.execute(
            "INSERT INTO api_keys (key_hash, user_name, label) VALUES ($1, $2, $3)",
            &[&key_hash, &user, &label],
        )
        .await?;
        Ok(())
    }

    pub(super) async fn api_key_user_pg(
        &self,
        key_hash: &str,
    ) -> Result<Option<String>, StoreError> {
        let conn = self.conn().await?;
        let row = conn
            .query_opt(
                "SELECT user_name FROM api_keys WHERE key_hash = $1",
                &[&key_hash],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    pub(super) async fn api_keys_pg(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        let conn = self.conn().await?;
        let rows = conn
            .query(
                "SELECT key_hash, user_name, label FROM api_keys ORDER BY user_name, label",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| ApiKeyRecord {
                key_hash: r.get(0),
                user: r.get(1),
                label: r.get(2),
            })
            .collect())
    }

    pub(super) async fn remove_api_key_pg(&self, key_hash: &str) -> Result<bool, StoreError> {
        let conn = self.conn().await?;
        let n = conn
            .execute("DELETE FROM api_keys WHERE key_hash = $1", &[&key_hash])
            .await?;
        note_revocation();
        Ok(n > 0)
    }

    pub(super) async fn remove_user_pg(&self, name: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        tx.execute("DELETE FROM api_keys WHERE user_name = $1", &[&name])
            .await?;
        tx.execute("DELETE FROM tokens WHERE user_name = $1", &[&name])
            .await?;
        let n = tx
            .execute("DELETE FROM users WHERE name = $1", &[&name])
            .await?;
        tx.commit().await?;
        note_revocation();
        Ok(n > 0)
    }

    pub(super) async fn put_token_pg(
        &self,
        token_hash: &str,
        user: &str,
        expires: DateTime<FixedOffset>,
        keep: usize,
    ) -> Result<(), StoreError> {
        // The token just issued always stays.
        let keep = i64::try_from(keep.max(1)).unwrap_or(i64::MAX);
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        tx.execute(
            "INSERT INTO tokens (token_hash, user_name, expires_at) VALUES ($1, $2, $3)
             ON CONFLICT (token_hash) DO UPDATE
               SET user_name = excluded.user_name, expires_at = excluded.expires_at",
            &[&token_hash, &user, &expires],
        )
        .await?;
        tx.execute(
            "DELETE FROM tokens WHERE user_name = $1 AND (expires_at < now()
               OR token_hash NOT IN (SELECT token_hash FROM tokens WHERE user_name = $1
                                     ORDER BY expires_at DESC, token_hash LIMIT $2))",
            &[&user, &keep],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn token_user_pg(
        &self,
        token_hash: &str,
        now: DateTime<FixedOffset>,
    ) -> Result<Option<(String, DateTime<FixedOffset>)>, StoreError> {
        let conn = self.conn().await?;
        let row = conn
            .query_opt(
                "SELECT user_name, expires_at FROM tokens WHERE token_hash = $1",
                &[&token_hash],
            )
            .await?;
        Ok(row.and_then(|r| {
            let exp: DateTime<Utc> = r.get(1);
            (exp > now).then(|| (r.get(0), local(exp)))
        }))
    }
}

//! The durable backend: a [redb] database, one file (or redb's in-memory
//! backend). Objects and statuses are JSON rows keyed by object key, plugin
//! key-value data rows keyed by (plugin, key), and the uid and version
//! counters in a meta table.
//!
//! Guarantee: a [`Backend::commit`] is one redb write transaction, committed
//! with fsync before it returns: all of it is stored or none.
//!
//! [redb]: https://docs.rs/redb

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;

use super::StoreError;
use super::backend::{Backend, Commit, Loaded};
use crate::object::{Object, ObjectKey};

const OBJECTS: TableDefinition<&str, &[u8]> = TableDefinition::new("objects");
const STATUS: TableDefinition<&str, &[u8]> = TableDefinition::new("status");
const KV: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// A store's data in a redb database.
pub struct Redb {
    db: Database,
}

impl Redb {
    /// A database in memory: nothing survives the process.
    pub fn in_memory() -> Self {
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .expect("an in-memory database always opens");
        Self { db }
    }

    /// The database in `path`, created (with its folder) if missing.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                anyhow::anyhow!(
                    "cannot create the store's folder {}: {e}; set [store] path",
                    dir.display()
                )
            })?;
        }
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => anyhow::anyhow!(
                "the store {} is in use by another setpoint process; stop it, or give this \
                 one its own [store] path",
                path.display()
            ),
            e => anyhow::anyhow!(
                "cannot open the store {}: {e}; if the file is not a Setpoint store, move it \
                 away or set [store] path",
                path.display()
            ),
        })?;
        Ok(Self { db })
    }
}

impl Backend for Redb {
    fn load(&self) -> Result<Loaded, StoreError> {
        let db = &self.db;
        let mut loaded = Loaded::default();
        {
            // Create the tables, so a fresh file reads like an empty store.
            let txn = db.begin_write()?;
            txn.open_table(OBJECTS)?;
            txn.open_table(STATUS)?;
            txn.open_table(KV)?;
            txn.open_table(META)?;
            txn.commit()?;
        }
        let txn = db.begin_read()?;
        let corrupt = |what: &str, key: &str, e: serde_json::Error| {
            StoreError::Storage(format!("stored {what} {key} is unreadable: {e}"))
        };
        for entry in txn.open_table(OBJECTS)?.iter()? {
            let (k, v) = entry?;
            let object: Object =
                serde_json::from_slice(v.value()).map_err(|e| corrupt("object", k.value(), e))?;
            loaded.objects.push(object);
        }
        for entry in txn.open_table(STATUS)?.iter()? {
            let (k, v) = entry?;
            let key: ObjectKey = k
                .value()
                .parse()
                .map_err(|e: String| StoreError::Storage(e))?;
            let status =
                serde_json::from_slice(v.value()).map_err(|e| corrupt("status", k.value(), e))?;
            loaded.status.push((key, status));
        }
        for entry in txn.open_table(KV)?.iter()? {
            let (k, v) = entry?;
            let (plugin, key) = k.value();
            loaded
                .kv
                .push(((plugin.to_string(), key.to_string()), v.value().to_vec()));
        }
        let meta = txn.open_table(META)?;
        loaded.next_uid = meta.get("next_uid")?.map_or(0, |v| v.value());
        loaded.next_version = meta.get("next_version")?.map_or(0, |v| v.value());
        Ok(loaded)
    }

    fn commit(&self, commit: &Commit<'_>) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            put_json(&mut txn.open_table(OBJECTS)?, commit.objects)?;
            put_json(&mut txn.open_table(STATUS)?, commit.status)?;
            let mut table = txn.open_table(KV)?;
            for ((plugin, key), value) in commit.kv {
                let key = (plugin.as_str(), key.as_str());
                match value {
                    Some(v) => table.insert(key, v.as_slice())?,
                    None => table.remove(key)?,
                };
            }
            let mut meta = txn.open_table(META)?;
            meta.insert("next_uid", commit.next_uid)?;
            meta.insert("next_version", commit.next_version)?;
        }
        txn.commit()?;
        Ok(())
    }
}

impl From<redb::Error> for StoreError {
    fn from(e: redb::Error) -> Self {
        StoreError::Storage(e.to_string())
    }
}

macro_rules! storage_errors {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Storage(e.to_string())
            }
        }
    )*};
}
storage_errors!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// Write rows keyed by object key as JSON, removing those that are `None`.
fn put_json<T: Serialize>(
    table: &mut redb::Table<&str, &[u8]>,
    rows: &[(ObjectKey, Option<T>)],
) -> Result<(), StoreError> {
    for (key, value) in rows {
        let key = key.to_string();
        match value {
            Some(v) => {
                let bytes = serde_json::to_vec(v).expect("stored rows serialize");
                table.insert(key.as_str(), bytes.as_slice())?;
            }
            None => {
                table.remove(key.as_str())?;
            }
        }
    }
    Ok(())
}

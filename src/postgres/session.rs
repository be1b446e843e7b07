//! A connection's client with the statements prepared on it: what every engine call uses.

use std::collections::HashMap;
use std::ops::Deref;

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Row, Statement};

/// A client and the statements prepared on its connection, by their SQL: what a call uses.
pub(crate) struct Session {
    client: Client,
    statements: HashMap<String, Statement>,
}

impl Session {
    pub(super) fn new(client: Client) -> Session {
        Session {
            client,
            statements: HashMap::new(),
        }
    }

    /// The client, mutably: transactions need `&mut Client`.
    pub(super) fn client_mut(&mut self) -> &mut Client {
        &mut self.client
    }

    /// `sql` prepared on this connection with parameters of `types`, once per connection:
    /// a prepared statement is parsed and planned by the server once, and each use of it is
    /// one round trip.
    pub(crate) async fn statement(
        &mut self,
        sql: &str,
        types: &[Type],
    ) -> std::result::Result<Statement, tokio_postgres::Error> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare_typed(sql, types).await?;
        self.statements.insert(sql.to_string(), statement.clone());
        Ok(statement)
    }

    /// Runs `sql`, prepared once per connection, with `params` and their types.
    pub(crate) async fn query_prepared(
        &mut self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> std::result::Result<Vec<Row>, tokio_postgres::Error> {
        let types: Vec<Type> = params.iter().map(|(_, ty)| ty.clone()).collect();
        let statement = self.statement(sql, &types).await?;
        let values: Vec<&(dyn ToSql + Sync)> = params.iter().map(|(value, _)| *value).collect();
        self.client.query(&statement, &values).await
    }
}

impl Deref for Session {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

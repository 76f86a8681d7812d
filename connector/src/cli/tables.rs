//! `sluice tables` and `sluice whoami`: what a connector serves to you,
//! and who it takes you for.

use anyhow::Result;
use datafusion::arrow::array::{Array, BinaryArray, StringArray};
use datafusion::arrow::ipc::reader::StreamReader;
use datafusion::arrow::record_batch::RecordBatch;

use super::conn::ConnArgs;

pub async fn tables(args: ConnArgs) -> Result<()> {
    let mut conn = args.connect().await?;
    let result = conn.tables().await?;
    for batch in &result.batches {
        let names = column::<StringArray>(batch, "table_name")?;
        let schemas = column::<BinaryArray>(batch, "table_schema")?;
        for row in 0..batch.num_rows() {
            println!("{}", names.value(row));
            if schemas.is_valid(row) {
                for field in decode_ipc_schema(schemas.value(row))?.fields() {
                    println!(
                        "    {:<20} {}{}",
                        field.name(),
                        field.data_type(),
                        if field.is_nullable() { "" } else { " NOT NULL" }
                    );
                }
            }
        }
    }
    Ok(())
}

fn column<'a, T: 'static>(batch: &'a RecordBatch, name: &str) -> Result<&'a T> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| {
            anyhow::anyhow!("the server's GetTables result has no usable `{name}` column")
        })
}

/// GetTables carries each table's schema as an IPC schema message.
fn decode_ipc_schema(bytes: &[u8]) -> Result<datafusion::arrow::datatypes::SchemaRef> {
    let reader = StreamReader::try_new(std::io::Cursor::new(bytes), None)?;
    Ok(reader.schema())
}

pub async fn whoami(args: ConnArgs) -> Result<()> {
    let conn = args.connect().await?;
    let mut client =
        sluice_proto::v1::connector_service_client::ConnectorServiceClient::new(conn.channel());
    let me = client
        .who_am_i(sluice_proto::v1::WhoAmIRequest {})
        .await
        .map_err(sluice::client::status_error)?
        .into_inner();
    println!("principal:    {}", me.principal_id);
    println!("organization: {}", me.organization);
    println!("common name:  {}", me.common_name);
    for uri in &me.san_uris {
        println!("SAN URI:      {uri}");
    }
    println!("certificate:  sha256:{}", me.certificate_sha256);
    Ok(())
}

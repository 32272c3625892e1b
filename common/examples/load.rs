//! Load N keys of a given size through one pipelined connection, as fast as the cluster takes
//! them. Used by the benchmark scripts to prepare data.
//!
//!     cargo run --release -p ringkv-common --example load -- ADDR KEYS VALUE_BYTES [IN_FLIGHT]

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use ringkv_common::client::Client;
use ringkv_common::protocol::{Request, Response, Role, DEFAULT_MAX_FRAME_LEN};
use tokio::sync::Semaphore;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: load ADDR KEYS VALUE_BYTES [IN_FLIGHT]";
    let addr = args.get(1).ok_or(usage)?;
    let keys: u64 = args.get(2).ok_or(usage)?.parse()?;
    let size: usize = args.get(3).ok_or(usage)?.parse()?;
    let in_flight: usize = args.get(4).map_or(Ok(256), |s| s.parse())?;
    let client = Client::connect(addr, Role::Client, DEFAULT_MAX_FRAME_LEN).await?;
    let value = Bytes::from(vec![b'x'; size]);
    let permits = Arc::new(Semaphore::new(in_flight));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(keys as usize);
    for i in 0..keys {
        let permit = permits.clone().acquire_owned().await?;
        let client = client.clone();
        let value = value.clone();
        tasks.push(tokio::spawn(async move {
            let key = Bytes::from(format!("key-{i:08}"));
            let r = client.call(Request::Put { key, value }).await;
            drop(permit);
            matches!(r, Ok(Response::Written { .. }))
        }));
    }
    let mut ok = 0u64;
    for t in tasks {
        if t.await? {
            ok += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "loaded {ok}/{keys} keys of {size} B in {secs:.1} s ({:.0} puts/s)",
        ok as f64 / secs
    );
    if ok != keys {
        return Err(format!("{} puts failed", keys - ok).into());
    }
    Ok(())
}

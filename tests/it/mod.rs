mod cli;
mod fraud_path;
mod rebalance;
mod recovery;
mod redis_outage;
mod restart;
mod schemas;
mod util;

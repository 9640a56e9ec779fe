mod cli;
mod fraud_path;
mod rebalance;
mod recovery;
mod restart;
mod schemas;
mod util;

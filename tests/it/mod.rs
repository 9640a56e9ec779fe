mod cli;
mod fraud_path;
mod recovery;
mod restart;
mod schemas;
mod util;

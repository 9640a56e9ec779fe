mod cli;
mod fraud_path;
mod restart;
mod schemas;
mod util;

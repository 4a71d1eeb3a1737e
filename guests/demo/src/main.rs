#![no_std]
#![no_main]
use rebound_guest::{Cpu, println};

fn main(cpu: Cpu) -> i32 {
    println!(
        "hello from vCPU {} of {} args={:?}",
        cpu.id(),
        cpu.count(),
        cpu.args()
    );
    let v = alloc::vec![1u64, 2, 3];
    println!("sum {}", v.iter().sum::<u64>());
    7
}
extern crate alloc;
rebound_guest::entry!(main);

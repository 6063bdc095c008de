//! Backend operations as ring entries: the one place `backend::io::Op`
//! becomes an io_uring opcode. `user_data` is added by the caller.

use io_uring::{opcode, squeue, types};

use crate::backend::io::Op;

pub fn entry(op: &Op) -> squeue::Entry {
    match *op {
        Op::Read { fd, into, offset } => match into.fixed {
            Some(index) => opcode::ReadFixed::new(types::Fd(fd), into.ptr, into.len, index).offset(offset).build(),
            None => opcode::Read::new(types::Fd(fd), into.ptr, into.len).offset(offset).build(),
        },
        Op::Write { fd, from, offset, dsync } => {
            let flags = if dsync { libc::RWF_DSYNC } else { 0 };
            match from.fixed {
                Some(index) => opcode::WriteFixed::new(types::Fd(fd), from.ptr.cast_const(), from.len, index)
                    .offset(offset)
                    .rw_flags(flags)
                    .build(),
                None => opcode::Write::new(types::Fd(fd), from.ptr.cast_const(), from.len)
                    .offset(offset)
                    .rw_flags(flags)
                    .build(),
            }
        }
        Op::Allocate { fd, offset, length, mode } => {
            opcode::Fallocate::new(types::Fd(fd), length).offset(offset).mode(mode).build()
        }
        Op::Sync { fd } => opcode::Fsync::new(types::Fd(fd)).flags(types::FsyncFlags::DATASYNC).build(),
        Op::Prefetch { fd, offset, length } => {
            opcode::Fadvise::new(types::Fd(fd), length as libc::off_t, libc::POSIX_FADV_WILLNEED).offset(offset).build()
        }
    }
}

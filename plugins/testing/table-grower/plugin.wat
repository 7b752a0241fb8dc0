;; A plugin written in WebAssembly text, for what a Rust guest cannot do:
;; its `on-publish` grows a table by a thousand elements per byte of the
;; message's data (JSON text, quotes included), pushing against the host's
;; bound on table elements, and passes the message. The tests build it into
;; a component of world `publish-filter` (tests/support: `wat_plugin`).
(module
  (memory (export "memory") 1)
  (table $grown 0 funcref)
  ;; The host's allocations for a call's arguments: a bump pointer, reset
  ;; when the call ends.
  (global $next (mut i32) (i32.const 1024))
  (func (export "cabi_realloc")
    (param $old i32) (param $old_size i32) (param $align i32) (param $size i32)
    (result i32)
    (local $at i32)
    (local.set $at
      (i32.and
        (i32.add (global.get $next) (i32.sub (local.get $align) (i32.const 1)))
        (i32.sub (i32.const 0) (local.get $align))))
    (global.set $next (i32.add (local.get $at) (local.get $size)))
    (if (i32.gt_u (global.get $next) (i32.const 65536))
      (then (unreachable)))
    (local.get $at))
  ;; on-publish(message) -> publish-verdict. The message record comes
  ;; flattened: id, tenant (pointer, length each), target (case and two
  ;; words), data (pointer, length). The verdict goes back by pointer.
  (func (export "pushgate:plugin/on-publish@0.1.1#on-publish")
    (param $id i32) (param $id_len i32)
    (param $tenant i32) (param $tenant_len i32)
    (param $target i32) (param $target_a i32) (param $target_b i32)
    (param $data i32) (param $data_len i32)
    (result i32)
    (drop
      (table.grow $grown (ref.null func)
        (i32.mul (local.get $data_len) (i32.const 1000))))
    (global.set $next (i32.const 1024))
    ;; publish-verdict::pass
    (i32.store8 (i32.const 0) (i32.const 0))
    (i32.const 0))
)

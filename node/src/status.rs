//! What `understudy status` answers. The JSON field names are part of the admin API: the test
//! below pins them.

use std::path::PathBuf;

use serde::Serialize;

/// How this VM came to be.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Origin {
    /// A backup holding a replica; no VM runs yet.
    Backup {
        /// Listening address.
        listen: String,
    },
    /// Promoted from a backup's replica.
    Promoted {
        /// The epoch the replica held.
        epoch: u64,
        /// Digest of the replica memory when promoted.
        memory_digest: String,
        /// Milliseconds from the promote request to the guest running.
        promote_ms: f64,
        /// Frames of the inbound log replayed into the guest before it resumed (delivered by the
        /// primary after the replica's checkpoint).
        replayed_frames: u64,
        /// Frames of the output log written to the TAP at promotion (output of the replica's
        /// epochs the primary had not released).
        output_written_frames: u64,
    },
    /// A migration destination waiting for, or receiving, a migration; no VM runs yet.
    Destination {
        /// Listening address.
        listen: String,
    },
    /// Migrated here from a source.
    Migrated {
        /// The source's certificate name.
        source: String,
        /// The switch-over epoch it resumed from.
        epoch: u64,
        /// Milliseconds from the hand-over to the guest running here.
        resume_ms: f64,
        /// Digest of the received memory at the hand-over, before the guest ran (`receive
        /// --verify`).
        memory_digest: Option<String>,
    },
    /// Booted from a kernel.
    Booted {
        /// The kernel.
        kernel: PathBuf,
    },
    /// Restored from a snapshot.
    Restored {
        /// The snapshot directory.
        from: PathBuf,
        /// Digest of guest memory when restored, before the guest ran.
        memory_digest: String,
        /// Milliseconds from process start to the VM resuming.
        restore_ms: f64,
    },
}

/// The role a status names (`"primary"` for any process running a VM).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RoleName {
    /// Runs the VM (booted, restored or promoted; protected or not).
    Primary,
    /// Holds a replica.
    Backup,
    /// Waits for, or receives, a migration.
    Destination,
}

/// Where a running VM stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// vCPUs run.
    Running,
    /// Paused (by request, or for a snapshot).
    Paused,
    /// Stopped for good.
    Stopped,
}

/// Whether the arbitration agent runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ArbitrationState {
    /// Its arbiter task runs.
    Running,
    /// Its arbiter task ended (the process then stops its guest and exits non-zero).
    Failed,
}

/// The arbitration agent's state, when arbitration is configured.
#[derive(Debug, Clone, Serialize)]
pub struct ArbitrationStatus {
    /// This process's raft node id.
    pub node: u64,
    /// Running or failed.
    pub state: ArbitrationState,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The status of a process that runs a VM.
#[derive(Debug, Clone, Serialize)]
pub struct VmStatus {
    /// Always [`RoleName::Primary`].
    pub role: RoleName,
    /// Running, paused or stopped.
    pub state: VmState,
    /// Seconds since the process started.
    pub uptime_s: f64,
    /// Guest memory size.
    pub memory_bytes: u64,
    /// The guest's kernel command line.
    pub cmdline: String,
    /// How the VM came to be.
    pub origin: Origin,
    /// Why the VM stopped, once it did.
    pub stopped_reason: Option<String>,
    /// Protection, while the VM is protected.
    pub protection: Option<primary::stats::StatusReport>,
    /// Arbitration, when configured.
    pub arbitration: Option<ArbitrationStatus>,
    /// The migration away from here, once one was asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migration: Option<primary::migrate::MigrationStatus>,
    /// Automatic re-protection after a promotion, when the backup named standbys
    /// (`backup --reprotect-to`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reprotect: Option<crate::reprotect::ReprotectStatus>,
}

/// The status of a backup process (no VM runs yet).
#[derive(Debug, Clone, Serialize)]
pub struct BackupProcessStatus {
    /// Always [`RoleName::Backup`].
    pub role: RoleName,
    /// Seconds since the process started.
    pub uptime_s: f64,
    /// Guest memory size.
    pub memory_bytes: u64,
    /// [`Origin::Backup`].
    pub origin: Origin,
    /// The backup server's status.
    pub backup: Option<backup::server::BackupStatus>,
    /// Arbitration, when configured.
    pub arbitration: Option<ArbitrationStatus>,
    /// A migration destination's progress.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migration: Option<backup::receive::ReceiveStatus>,
}

/// What `status` answers (one per request, serialized at once: the size of its variants does
/// not matter).
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
#[allow(clippy::large_enum_variant)]
pub enum Status {
    /// A VM runs here.
    Vm(VmStatus),
    /// A backup waits here.
    Backup(BackupProcessStatus),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(v: &serde_json::Value) -> Vec<&str> {
        v.as_object().expect("an object").keys().map(String::as_str).collect()
    }

    /// The field names a booted VM's status had when it was built with `json!` in the binary.
    #[test]
    fn booted_vm_status_keeps_its_field_names() {
        let s = Status::Vm(VmStatus {
            role: RoleName::Primary,
            state: VmState::Running,
            uptime_s: 1.5,
            memory_bytes: 64 << 20,
            cmdline: "workload=counter".into(),
            origin: Origin::Booted { kernel: "guest.elf".into() },
            stopped_reason: None,
            protection: None,
            arbitration: None,
            migration: None,
            reprotect: None,
        });
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(
            keys(&v),
            [
                "arbitration",
                "cmdline",
                "memory_bytes",
                "origin",
                "protection",
                "role",
                "state",
                "stopped_reason",
                "uptime_s"
            ]
        );
        assert_eq!(v["role"], "primary");
        assert_eq!(v["state"], "running");
        assert!(v["protection"].is_null() && v["stopped_reason"].is_null());
        assert_eq!(keys(&v["origin"]), ["kernel", "kind"]);
        assert_eq!(v["origin"]["kind"], "booted");
        let paused = serde_json::to_value(VmState::Paused).unwrap();
        assert_eq!(paused, "paused");
        assert_eq!(serde_json::to_value(VmState::Stopped).unwrap(), "stopped");
    }

    /// The field names a backup's status had when it was built with `json!` in the binary.
    #[test]
    fn backup_status_keeps_its_field_names() {
        let s = Status::Backup(BackupProcessStatus {
            role: RoleName::Backup,
            uptime_s: 0.5,
            memory_bytes: 64 << 20,
            origin: Origin::Backup { listen: "127.0.0.1:7000".into() },
            backup: Some(backup::server::BackupStatus { state: "waiting".into(), ..Default::default() }),
            arbitration: Some(ArbitrationStatus { node: 2, state: ArbitrationState::Running, reason: None }),
            migration: None,
        });
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(keys(&v), ["arbitration", "backup", "memory_bytes", "origin", "role", "uptime_s"]);
        assert_eq!(v["arbitration"], serde_json::json!({"node": 2, "state": "running"}));
        let failed = ArbitrationStatus { node: 1, state: ArbitrationState::Failed, reason: Some("journal".into()) };
        let f = serde_json::to_value(failed).unwrap();
        assert_eq!(f, serde_json::json!({"node": 1, "state": "failed", "reason": "journal"}));
        assert_eq!(v["role"], "backup");
        assert_eq!(v["origin"], serde_json::json!({"kind": "backup", "listen": "127.0.0.1:7000"}));
        assert_eq!(
            keys(&v["backup"]),
            [
                "commit_us_mean",
                "commits",
                "committed_epoch",
                "connected",
                "consistent_epoch",
                "failed_sessions",
                "inbound_log",
                "last_error",
                "output_log",
                "pages",
                "primary",
                "rejected",
                "rollback_epoch",
                "since_last_commit_s",
                "state"
            ]
        );
        let promoted = Origin::Promoted {
            epoch: 3,
            memory_digest: "not computed".into(),
            promote_ms: 2.0,
            replayed_frames: 1,
            output_written_frames: 2,
        };
        let p = serde_json::to_value(promoted).unwrap();
        assert_eq!(
            keys(&p),
            ["epoch", "kind", "memory_digest", "output_written_frames", "promote_ms", "replayed_frames"]
        );
        // The inbound log's fields (`understudy status --json`, docs/operations.md).
        assert_eq!(
            keys(&v["backup"]["inbound_log"]),
            [
                "bytes",
                "frames",
                "lan_copy",
                "lan_copy_frames",
                "lan_copy_frames_read",
                "lan_copy_overflow_frames",
                "lan_copy_replayed_frames",
                "lan_copy_unmatched",
                "overflow_frames",
                "pruned_frames",
                "received_frames",
                "replayed_frames",
                "side_copy_logged_frames",
                "side_copy_port",
                "side_copy_received_frames",
                "side_copy_rejected_frames",
                "side_copy_stale_frames",
                "skipped_frames"
            ]
        );
        // The output log's fields (`understudy status --json`, docs/operations.md).
        assert_eq!(
            keys(&v["backup"]["output_log"]),
            [
                "bytes",
                "dropped_frames",
                "epochs",
                "frames",
                "overflow_frames",
                "received_frames",
                "released_frames",
                "written_frames"
            ]
        );
        let fwd = serde_json::to_value(primary::inbound::InboundReport::default()).unwrap();
        assert_eq!(
            keys(&fwd),
            [
                "active",
                "forwarded_frames",
                "queue_dropped_frames",
                "refused_frames",
                "side_copy_dropped_frames",
                "side_copy_ns_mean",
                "side_copy_sent_frames",
                "side_copy_to"
            ]
        );
        assert_eq!(p["kind"], "promoted");
        let restored = Origin::Restored { from: "snap".into(), memory_digest: "00".into(), restore_ms: 1.0 };
        let r = serde_json::to_value(restored).unwrap();
        assert_eq!(keys(&r), ["from", "kind", "memory_digest", "restore_ms"]);
        assert_eq!(r["kind"], "restored");
    }

    /// The subset of JSON Schema docs/status.schema.json uses: `type` (a name or a list),
    /// `enum`, `required`, `properties`, `oneOf` (exactly one) and local `$ref`s. Returns where
    /// `v` breaks it.
    fn check(
        schema: &serde_json::Value,
        root: &serde_json::Value,
        v: &serde_json::Value,
        at: &str,
    ) -> Result<(), String> {
        use serde_json::Value;
        if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
            let name = r.strip_prefix("#/$defs/").ok_or_else(|| format!("{at}: unsupported $ref {r}"))?;
            return check(&root["$defs"][name], root, v, at);
        }
        if let Some(types) = schema.get("type") {
            let names: Vec<&str> = match types {
                Value::String(t) => vec![t.as_str()],
                Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
                _ => return Err(format!("{at}: bad type in the schema")),
            };
            let is = |t: &str| match t {
                "null" => v.is_null(),
                "boolean" => v.is_boolean(),
                "string" => v.is_string(),
                "integer" => v.is_u64() || v.is_i64(),
                "number" => v.is_number(),
                "object" => v.is_object(),
                "array" => v.is_array(),
                _ => false,
            };
            if !names.iter().any(|t| is(t)) {
                return Err(format!("{at}: {v} is not {names:?}"));
            }
        }
        if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
            && !allowed.contains(v)
        {
            return Err(format!("{at}: {v} is not one of {allowed:?}"));
        }
        if let Some(obj) = v.as_object() {
            for key in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
                let key = key.as_str().unwrap_or_default();
                if !obj.contains_key(key) {
                    return Err(format!("{at}: required field {key:?} is missing"));
                }
            }
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (k, sub) in props {
                    if let Some(x) = obj.get(k) {
                        check(sub, root, x, &format!("{at}.{k}"))?;
                    }
                }
            }
        }
        if let Some(alts) = schema.get("oneOf").and_then(Value::as_array) {
            let fits: Vec<Result<(), String>> = alts.iter().map(|a| check(a, root, v, at)).collect();
            let n = fits.iter().filter(|r| r.is_ok()).count();
            if n != 1 {
                return Err(format!("{at}: fits {n} of the oneOf alternatives: {fits:?}"));
            }
        }
        Ok(())
    }

    /// `understudy status --json` follows docs/status.schema.json: a booted and protected VM, a
    /// promoted one, a backup with its inbound log, a waiting migration destination; and the
    /// checker refuses what breaks it.
    #[test]
    fn status_json_matches_the_documented_schema() {
        let schema: serde_json::Value = serde_json::from_str(include_str!("../../docs/status.schema.json")).unwrap();
        let ok = |s: &Status| {
            let v = serde_json::to_value(s).unwrap();
            check(&schema, &schema, &v, "status").unwrap_or_else(|e| panic!("{e}\n{v:#}"));
            v
        };
        let mut protection = primary::stats::Stats::new("10.0.0.2:7000".into()).report((1, 60));
        protection.inbound = Some(primary::inbound::InboundReport::default());
        let vm = |origin: Origin, protection: Option<primary::stats::StatusReport>| {
            Status::Vm(VmStatus {
                role: RoleName::Primary,
                state: VmState::Running,
                uptime_s: 1.5,
                memory_bytes: 64 << 20,
                cmdline: "workload=kv".into(),
                origin,
                stopped_reason: None,
                protection,
                arbitration: Some(ArbitrationStatus { node: 1, state: ArbitrationState::Running, reason: None }),
                migration: None,
                reprotect: None,
            })
        };
        let v = ok(&vm(Origin::Booted { kernel: "guest.elf".into() }, Some(protection)));
        ok(&vm(
            Origin::Promoted {
                epoch: 3,
                memory_digest: "not computed".into(),
                promote_ms: 1.0,
                replayed_frames: 2,
                output_written_frames: 1,
            },
            None,
        ));
        ok(&Status::Backup(BackupProcessStatus {
            role: RoleName::Backup,
            uptime_s: 0.5,
            memory_bytes: 64 << 20,
            origin: Origin::Backup { listen: "127.0.0.1:7400".into() },
            backup: Some(backup::server::BackupStatus { state: "consistent".into(), ..Default::default() }),
            arbitration: None,
            migration: None,
        }));
        ok(&Status::Backup(BackupProcessStatus {
            role: RoleName::Destination,
            uptime_s: 0.5,
            memory_bytes: 64 << 20,
            origin: Origin::Destination { listen: "0.0.0.0:7300".into() },
            backup: None,
            arbitration: None,
            migration: None,
        }));
        // What breaks it is refused, naming the field.
        let mut bad = v.clone();
        bad["protection"]["state"] = "sleepy".into();
        assert!(check(&schema, &schema, &bad, "status").unwrap_err().contains("status.protection.state"));
        let mut bad = v;
        bad.as_object_mut().unwrap().remove("uptime_s");
        assert!(check(&schema, &schema, &bad, "status").is_err());
    }
}

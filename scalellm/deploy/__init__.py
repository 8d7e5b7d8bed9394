"""Getting replicas running: the ReplicaLauncher interface and what drives it.

    launcher.py   ReplicaLauncher and ReplicaSet: start a set of a shape, its addresses, health,
                  drain, restart a dead replica, stop
    local.py      LocalLauncher: replica processes on this machine, with core lending between them
    autopilot.py  `--shape auto`: changes the serving set's shape with the load, through a launcher

The supervisor (scalellm/supervisor.py) runs one launcher's sets and the gateway; child processes and
ports are scalellm/process.py's.
"""

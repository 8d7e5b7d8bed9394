"""Deployment shapes (replicas × parallelism per replica), their profile, and the controller that
changes the shape with the load. See controller.py for the decision rule, autopilot.py for how a
change happens without dropping a request."""

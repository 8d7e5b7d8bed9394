"""Deployment shapes (replicas × parallelism per replica), their profile, and the controller that
decides when to change the shape with the load. See controller.py for the decision rule;
scalellm/deploy/autopilot.py carries a change out without dropping a request."""

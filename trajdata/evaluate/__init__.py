"""Policy evaluation: rolling out BC policies and experts (``trajdata eval``)."""

"""AWS connector validation: the connector model, credentials, partitions, steps and diagnoses."""

"""Loading models, describing their architecture, and changing their structure."""

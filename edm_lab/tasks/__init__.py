"""edm_lab.tasks"""

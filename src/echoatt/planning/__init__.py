"""What to change and where: the plan as a value made of changes, the planners that choose one, the cost model that
bounds its speed, the teacher's attention analysis and each candidate's measured loss, plan search as a library."""
